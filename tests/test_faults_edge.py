"""Faults an outside test found at the edges of the protocol (issue 14, faults 3, 4, 6 and 8):
keepalive pings against the servers' ping policy, unreadable request bytes, the bearer scheme's
case, and a tokenizer with tokens beyond its model's vocabulary."""

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from conftest import all_sessions_freed
from pearl.client import Client
from pearl.cluster import Cluster
from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.models import load_model, tiny_model, tiny_tokenizer

PROMPT = [11, 12, 13, 14, 15]
GARBAGE = b"\xff\xff\xff\xff\x0f\x01"  # a varint that never ends: no message parses it
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def raw_unary_stream(address: str, method: str, body: bytes) -> grpc.RpcError | None:
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_stream(method, request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
        try:
            list(call(body, timeout=30))
        except grpc.RpcError as e:
            return e
    return None


def raw_stream(address: str, method: str, messages: list[bytes]) -> tuple[grpc.StatusCode, str]:
    """Send ``messages`` (raw bytes) on a bidirectional stream and return how it ended."""
    with grpc.insecure_channel(address) as ch:
        call = ch.stream_stream(method, request_serializer=lambda b: b,
                                response_deserializer=lambda b: b)
        it = call(iter(messages), timeout=30)
        try:
            for _ in it:
                pass
        except grpc.RpcError as e:
            return e.code(), e.details()
        return it.code(), it.details()


# Fault 4: bytes that are no message. Before: Generate answered UNKNOWN ("Unexpected
# DecodeError"), Verify too, and the Draft stream ended OK.

def test_unreadable_generate_request_is_invalid_argument(cluster):
    err = raw_unary_stream(cluster.address, "/pearl.v1.Coordinator/Generate", GARBAGE)
    assert err is not None and err.code() == INVALID, err
    assert "unreadable request message" in err.details()
    assert "GenerateRequest" in err.details()


def _start(service: str) -> bytes:
    sampling = pb.SamplingParams(temperature=0)
    if service == "Draft":
        return pb.DraftRequest(start=pb.DraftStart(session_id="s", prompt_ids=PROMPT,
                                                   sampling=sampling, window_id=1,
                                                   draft_until=len(PROMPT) + 2)
                               ).SerializeToString()
    return pb.VerifyRequest(start=pb.VerifyStart(session_id="s", prompt_ids=PROMPT,
                                                 sampling=sampling, first_token=True)
                            ).SerializeToString()


@pytest.mark.parametrize("service", ["Draft", "Verify"])
@pytest.mark.parametrize("after_start", [False, True], ids=["first", "after-start"])
def test_unreadable_message_ends_an_internal_stream_with_invalid_argument(cluster, service,
                                                                          after_start):
    address = cluster.draft_address if service == "Draft" else cluster.target_address
    method = f"/pearl.v1.{'DraftService' if service == 'Draft' else 'TargetService'}/{service}"
    messages = [_start(service), GARBAGE] if after_start else [GARBAGE]
    code, details = raw_stream(address, method, messages)
    assert code == INVALID, (code, details)  # never OK: the message was not read
    assert "unreadable request message" in details
    all_sessions_freed(cluster)  # the session was closed, nothing leaked
    with Client(cluster.address, timeout_s=30) as c:  # and the services still serve
        assert len(c.complete(PROMPT, mode="pearl", max_new_tokens=4).token_ids) == 4


def test_unreadable_unary_request_is_invalid_argument(cluster):
    with grpc.insecure_channel(cluster.target_address) as ch:
        call = ch.unary_unary("/pearl.v1.TargetService/GetModelInfo",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as e:
            call(GARBAGE, timeout=10)
    assert e.value.code() == INVALID


# Fault 6: RFC 7235 makes the auth scheme case-insensitive; the token stays exact.

TOKEN = "s3cret-Token"


@pytest.fixture(scope="module")
def auth_cluster(tiny_target):
    c = Cluster(None, tiny_target, coordinator_kw=dict(auth_token=TOKEN))
    yield c
    c.close()


@pytest.mark.parametrize("header,ok", [
    (f"Bearer {TOKEN}", True),
    (f"bearer {TOKEN}", True),
    (f"BEARER {TOKEN}", True),
    (f"bEaReR  {TOKEN}", True),  # 1*SP between scheme and token
    (f"bearer {TOKEN.lower()}", False),  # the token is compared exactly
    (f"Bearer {TOKEN}x", False),
    (f"Bearer{TOKEN}", False),
    (f"Basic {TOKEN}", False),
    ("bearer ", False),
])
def test_bearer_scheme_is_case_insensitive(auth_cluster, header, ok):
    with grpc.insecure_channel(auth_cluster.address) as ch:
        stub = pearl_pb2_grpc.CoordinatorStub(ch)
        req = pb.GenerateRequest(prompt_ids=PROMPT, max_new_tokens=1, mode=pb.MODE_AR)
        call = stub.Generate(req, timeout=30, metadata=(("authorization", header),))
        if ok:
            assert list(call)[-1].HasField("stats")
        else:
            with pytest.raises(grpc.RpcError) as e:
                list(call)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


# Fault 8: a local folder whose tokenizer has a token the model has no embedding for.

@pytest.fixture(scope="module")
def short_vocab_folder(tmp_path_factory) -> Path:
    """A 48-token model whose tokenizer gained `<|endoftext|>` as id 48 (as transformers adds an
    eos_token missing from the vocabulary)."""
    folder = tmp_path_factory.mktemp("short-vocab")
    tok = tiny_tokenizer(48)
    tok.add_special_tokens({"eos_token": "<|endoftext|>"})
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 48
    tiny_model(2, vocab_size=48).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_tokens_beyond_the_vocabulary_are_named_at_load_and_refused_in_prompts(
        short_vocab_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="pearl.models"):
        loaded = load_model(str(short_vocab_folder), dtype="float32")
    warned = [r.getMessage() for r in caplog.records if r.name == "pearl.models"]
    assert len(warned) == 1 and "48 '<|endoftext|>'" in warned[0], warned
    assert "vocabulary of 48" in warned[0]
    c = Cluster(None, loaded)
    try:
        with Client(c.address, timeout_s=30) as client:
            assert len(client.complete("abc", mode="ar", max_new_tokens=3).token_ids) == 3
            with pytest.raises(grpc.RpcError) as e:
                client.complete("abc<|endoftext|>", mode="ar", max_new_tokens=3)
    finally:
        c.close()
    assert e.value.code() == INVALID  # was UNAVAILABLE: the target refused the start
    assert "[48]" in e.value.details() and "<|endoftext|>" in e.value.details()


def test_a_fitting_tokenizer_loads_without_warning(tmp_path, caplog):
    tok = tiny_tokenizer(48)
    tok.add_special_tokens({"eos_token": "<|endoftext|>"})
    tiny_model(2, vocab_size=49).save_pretrained(tmp_path)  # room for id 48
    tok.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pearl.models"):
        load_model(str(tmp_path), dtype="float32")
    assert not [r for r in caplog.records if r.name == "pearl.models"]


# Fault 3: the clients ping every keepalive period; the servers must accept it. Before, the
# servers kept gRPC's default policy (a ping more often than every 5 minutes on a connection
# without data is a strike, the third one is answered GOAWAY too_many_pings).

SILENT_S = 6.0  # a prefill this long: ~6 client pings (gRPC sends at most one a second)


def slow_request() -> None:
    """Run in a process of its own with PEARL_KEEPALIVE_S set: an ar request whose prefill sends
    nothing for SILENT_S, many keepalive periods, through coordinator and target."""
    import torch  # noqa: F401

    from specdec.models import tiny_loaded
    from specdec.serving import KEEPALIVE_S

    assert KEEPALIVE_S == float(os.environ["PEARL_KEEPALIVE_S"])
    target = tiny_loaded(2)
    slept = []

    def slow_prefill(module, args):
        if not slept:
            slept.append(True)
            time.sleep(SILENT_S)

    target.model.model.embed_tokens.register_forward_pre_hook(slow_prefill)
    c = Cluster(None, target)
    try:
        with Client(c.address, timeout_s=60) as client:
            t0 = time.monotonic()
            r = client.complete(PROMPT, mode="ar", max_new_tokens=3)
        assert slept and time.monotonic() - t0 >= SILENT_S
        print("SURVIVED", r.token_ids, flush=True)
    finally:
        c.close()


def test_a_request_silent_for_many_keepalive_periods_survives():
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PEARL_KEEPALIVE_S": "0.2",
           "PYTHONPATH": os.pathsep.join([str(root / "tests"), str(root)])}
    run = subprocess.run([sys.executable, "-c", "import test_faults_edge as t; t.slow_request()"],
                         env=env, capture_output=True, text=True, timeout=180, cwd=root)
    assert "SURVIVED" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
