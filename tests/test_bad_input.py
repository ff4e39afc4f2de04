"""Bad input (docs/design.md section 11): each case gets the right status code and a message naming
the field; then hypothesis fuzzes the client API and the internal streams, and every server must
stay healthy and serve a correct request afterwards. Invalid sampling values are covered in
tests/test_sampling.py, the basic out-of-order stream messages in tests/test_protocol.py."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cluster_sessions, greedy_reference
from pearl.client import Client
from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.serving import MAX_MESSAGE_BYTES

PROMPT = [11, 12, 13, 14, 15]
CONTEXT = 1024  # the tiny models' max_position_embeddings
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def generate(cluster, timeout=30, **fields):
    with grpc.insecure_channel(cluster.address) as ch:
        return list(pearl_pb2_grpc.CoordinatorStub(ch).Generate(pb.GenerateRequest(**fields),
                                                               timeout=timeout))


def negative_max_new_tokens(n: int) -> bytes:
    """A GenerateRequest as a client that declares max_new_tokens int32 would encode -n: the
    varint of 2^64 - n (ten bytes), after prompt_ids. A uint32 reader keeps the low 32 bits."""
    body = pb.GenerateRequest(prompt_ids=PROMPT).SerializeToString()
    v, out = (1 << 64) - n, bytearray([4 << 3])  # field 4, varint
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return body + bytes(out)


@pytest.mark.parametrize("fields,field", [
    (dict(prompt="", max_new_tokens=4), "prompt is empty"),
    (dict(prompt_ids=[], max_new_tokens=4), "prompt is empty"),
    (dict(prompt_ids=[1] * CONTEXT, max_new_tokens=1), "prompt has 1024 tokens"),
    (dict(prompt="a" * 1030, max_new_tokens=1), "prompt has 1030 tokens"),
    (dict(prompt_ids=[1, 2, 99999], max_new_tokens=4), "prompt_ids"),
    (dict(prompt_ids=PROMPT, max_new_tokens=0), "max_new_tokens must be > 0"),
    (dict(prompt_ids=PROMPT, max_new_tokens=CONTEXT), "max_new_tokens (1024)"),
    (dict(prompt_ids=PROMPT, max_new_tokens=5000), "max_new_tokens=5000"),
    (dict(prompt_ids=PROMPT, max_new_tokens=4, mode=9), "mode 9"),
    (dict(prompt_ids=PROMPT, max_new_tokens=4, gamma=65), "gamma=65"),
    (dict(prompt_ids=PROMPT, max_new_tokens=4, gamma_max=1000), "gamma_max=1000"),
    (dict(prompt="hi", max_new_tokens=4, chat=True), "chat"),
])
def test_invalid_requests_name_the_field(cluster, fields, field):
    with pytest.raises(grpc.RpcError) as e:
        generate(cluster, **fields)
    assert e.value.code() == INVALID
    assert field in e.value.details()


def test_negative_max_new_tokens_is_refused(cluster):
    """uint32 on the wire: -5 arrives as 2^32 - 5 and is refused as beyond every limit."""
    raw = negative_max_new_tokens(5)
    assert pb.GenerateRequest.FromString(raw).max_new_tokens == 2**32 - 5
    with grpc.insecure_channel(cluster.address) as ch:
        call = ch.unary_stream("/pearl.v1.Coordinator/Generate",
                               request_serializer=lambda b: b,
                               response_deserializer=pb.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as e:
            list(call(raw, timeout=10))
    assert e.value.code() == INVALID
    assert f"max_new_tokens={2**32 - 5}" in e.value.details()


def test_message_over_the_size_limit(cluster):
    big = [("grpc.max_send_message_length", 2 * MAX_MESSAGE_BYTES)]
    with grpc.insecure_channel(cluster.address, options=big) as ch:
        req = pb.GenerateRequest(prompt="x" * (MAX_MESSAGE_BYTES + 1024), max_new_tokens=1)
        with pytest.raises(grpc.RpcError) as e:
            list(pearl_pb2_grpc.CoordinatorStub(ch).Generate(req, timeout=30))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # and a long prompt that fits is bounded too
        generate(cluster, prompt="x" * 2_000_000, max_new_tokens=1)
    assert e.value.code() == INVALID and "prompt has 2000000 characters" in e.value.details()


# -- the internal streams, out of protocol order -------------------------------------------------


def run_stream(address: str, stub, method: str, messages, timeout: float = 20):
    """Send ``messages``, close, and read every answer; returns (answers, RpcError or None)."""
    with grpc.insecure_channel(address) as ch:
        call = getattr(stub(ch), method)(iter(messages), timeout=timeout)
        got = []
        try:
            for r in call:
                got.append(r)
        except grpc.RpcError as e:
            return got, e
        return got, None


def V(**kw):
    return pb.VerifyRequest(window=pb.VerifyWindow(**kw))


START_T = pb.VerifyRequest(start=pb.VerifyStart(prompt_ids=PROMPT, first_token=True))
START_D = pb.DraftRequest(start=pb.DraftStart(prompt_ids=PROMPT, window_id=1, draft_until=6))


@pytest.mark.parametrize("messages,fragment", [
    ([START_T, V(position=6, bonus=True), V(position=5, bonus=True)], "window.position=5"),
    ([START_T, V(position=6, bonus=True), V(position=8, bonus=True)], "window.position=8"),
    ([START_T, START_T], "start sent twice"),
    ([pb.VerifyRequest(stop=pb.VerifyStop()), V(position=0)], None),  # stop ends the session
    ([V(position=5, draft_ids=[1], held=True)], "window before start"),  # unknown session
    ([pb.VerifyRequest()], "empty VerifyRequest"),
    ([START_T, V(position=6, draft_ids=[1, 2], held=True)], "window.held"),
    ([START_T, V(position=6, draft_ids=[600])], "outside the vocabulary"),
    ([START_T, V(position=6, draft_ids=[1] * 1100)], "the model takes 1024"),
    ([START_T, V(position=6, draft_ids=[1], q=[pb.TokenDistribution(probs_f16=b"\x00")])],
     "window.q"),
])
def test_target_stream_out_of_order(cluster, messages, fragment):
    got, err = run_stream(cluster.target_address, pearl_pb2_grpc.TargetServiceStub, "Verify",
                          messages)
    if fragment is None:
        assert err is None and got == []
        return
    assert err is not None and err.code() == INVALID
    assert fragment in err.details()


@pytest.mark.parametrize("messages,fragment", [
    ([pb.DraftRequest(rollback=pb.DraftRollback(keep=1, window_id=2, draft_until=3))],
     "rollback before start"),  # unknown session: sessions are bound to their stream
    ([pb.DraftRequest()], "empty DraftRequest"),
    ([START_D, START_D], "start sent twice"),
    ([START_D, pb.DraftRequest(extend=pb.DraftExtend(window_id=2, draft_until=3))],
     "goes back"),
    ([START_D, pb.DraftRequest(extend=pb.DraftExtend(window_id=2, draft_until=5000))],
     "extend.draft_until=5000"),
    ([START_D, pb.DraftRequest(rollback=pb.DraftRollback(keep=2, append_ids=[700],
                                                         window_id=2, draft_until=4))],
     "rollback.append_ids"),
    ([START_D, pb.DraftRequest(rollback=pb.DraftRollback(keep=0, window_id=2))],
     "empty sequence"),
    ([pb.DraftRequest(start=pb.DraftStart(prompt_ids=[3] * CONTEXT, draft_until=1))],
     "start.prompt_ids has 1024 tokens"),
    ([pb.DraftRequest(start=pb.DraftStart(prompt_ids=[1, -4]))], "outside the vocabulary"),
])
def test_draft_stream_out_of_order(cluster, messages, fragment):
    got, err = run_stream(cluster.draft_address, pearl_pb2_grpc.DraftServiceStub, "Draft",
                          messages)
    assert err is not None and err.code() == INVALID, (got, err)
    assert fragment in err.details()


# -- fuzzing -------------------------------------------------------------------------------------


def assert_healthy_and_correct(cluster, ref) -> None:
    for address in (cluster.address, cluster.draft_address, cluster.target_address):
        with grpc.insecure_channel(address) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    with Client(cluster.address, timeout_s=30) as c:
        for mode in ("pearl", "sd"):
            assert c.complete(PROMPT, mode=mode, max_new_tokens=8,
                              ignore_eos=True).token_ids == ref


@pytest.fixture(scope="module")
def ref8(tiny_target):
    return greedy_reference(tiny_target, PROMPT, 8)


floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, 0.5, 1.0, 1.5]))
sampling = st.builds(
    lambda t, k, p, seed: pb.SamplingParams(temperature=t, top_k=k, **p, **seed),
    floats, st.integers(-5, 2**31 - 1), st.one_of(st.just({}), floats.map(lambda x: {"top_p": x})),
    st.one_of(st.just({}), st.integers(0, 2**64 - 1).map(lambda s: {"seed": s})))
requests = st.builds(
    pb.GenerateRequest,
    prompt=st.text(max_size=40),
    prompt_ids=st.lists(st.integers(-3, 700), max_size=12),
    mode=st.integers(0, 6),
    max_new_tokens=st.one_of(st.integers(0, 6), st.integers(1000, 2**32 - 1)),
    sampling=sampling,
    gamma=st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1)),
    gamma_max=st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1)),
    stop=st.lists(st.text(max_size=4), max_size=3),
    ignore_eos=st.booleans(),
    chat=st.booleans(),
)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(req=requests)
def fuzz_client_api(cluster, req):
    with grpc.insecure_channel(cluster.address) as ch:
        try:
            out = list(pearl_pb2_grpc.CoordinatorStub(ch).Generate(req, timeout=30))
        except grpc.RpcError as e:
            assert e.code() == INVALID, (e.code(), e.details())
            return
    assert out[-1].HasField("stats")
    assert out[-1].stats.new_tokens <= req.max_new_tokens


def test_fuzz_client_api_leaves_servers_healthy(cluster, ref8):
    fuzz_client_api(cluster)
    assert_healthy_and_correct(cluster, ref8)


small = st.integers(0, 40)
ids = st.lists(st.integers(-2, 520), max_size=8)
dists = st.lists(st.builds(pb.TokenDistribution, token_ids=st.lists(st.integers(-1, 520),
                                                                   max_size=3),
                           probs_f16=st.binary(max_size=8)), max_size=3)
draft_msgs = st.one_of(
    st.builds(lambda p, w, u, s: pb.DraftRequest(start=pb.DraftStart(
        prompt_ids=p, window_id=w, draft_until=u, sampling=s)), ids, small, small,
        st.one_of(st.just(pb.SamplingParams()), sampling)),
    st.builds(lambda w, u: pb.DraftRequest(extend=pb.DraftExtend(window_id=w, draft_until=u)),
              small, small),
    st.builds(lambda k, a, w, u: pb.DraftRequest(rollback=pb.DraftRollback(
        keep=k, append_ids=a, window_id=w, draft_until=u)), small, ids, small, small),
    st.just(pb.DraftRequest(stop=pb.DraftStop())),
    st.just(pb.DraftRequest()),
)
verify_msgs = st.one_of(
    st.builds(lambda p, f, s: pb.VerifyRequest(start=pb.VerifyStart(
        prompt_ids=p, first_token=f, sampling=s)), ids, st.booleans(),
        st.one_of(st.just(pb.SamplingParams()), sampling)),
    st.builds(lambda p, d, q, b, h, ph: pb.VerifyRequest(window=pb.VerifyWindow(
        position=p, draft_ids=d, q=q, bonus=b, held=h, phase=ph)),
        small, ids, dists, st.booleans(), st.booleans(), st.text(max_size=5)),
    st.just(pb.VerifyRequest(stop=pb.VerifyStop())),
    st.just(pb.VerifyRequest()),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(dmsgs=st.lists(draft_msgs, max_size=6), vmsgs=st.lists(verify_msgs, max_size=6))
def fuzz_internal_streams(cluster, dmsgs, vmsgs):
    for address, stub, method, msgs in (
            (cluster.draft_address, pearl_pb2_grpc.DraftServiceStub, "Draft", dmsgs),
            (cluster.target_address, pearl_pb2_grpc.TargetServiceStub, "Verify", vmsgs)):
        got, err = run_stream(address, stub, method, msgs)
        assert err is None or err.code() == INVALID, (method, err.code(), err.details())


def test_fuzz_internal_streams_leave_servers_healthy(cluster, ref8):
    fuzz_internal_streams(cluster)
    assert_healthy_and_correct(cluster, ref8)
    assert cluster_sessions(cluster) == (0, 0)
