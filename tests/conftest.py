import copy
import os
import random
import socket
import sys
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, os.path.dirname(__file__))

from cluster import Cluster  # noqa: E402
from protos.v1 import pearl_pb2 as pb  # noqa: E402
from protos.v1 import pearl_pb2_grpc  # noqa: E402
from pearl.transfer_train import train  # noqa: E402
from specdec.models import LoadedModel, noisy_copy, tiny_loaded  # noqa: E402, F401
from target_service.hidden_transfer.layers import Transfer  # noqa: E402

torch.set_num_threads(1)


def greedy_reference(loaded: LoadedModel, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy generation of the model alone: the ground truth."""
    out = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="session")
def tiny_target() -> LoadedModel:
    return tiny_loaded(2)


@pytest.fixture(scope="session")
def tiny_draft(tiny_target) -> LoadedModel:
    return noisy_copy(tiny_target, 7, 0.08)


@pytest.fixture(scope="session")
def cluster(tiny_draft, tiny_target):
    c = Cluster(tiny_draft, tiny_target)
    yield c
    c.close()


# -- Hidden Transfer: one tiny target, its transfer layers trained once a session ----------------

HT_VOCAB, HT_K, HT_LAYER = 64, 3, 2


def ht_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, HT_VOCAB) for _ in range(length)] for _ in range(n)]


@pytest.fixture(scope="session")
def ht_target() -> LoadedModel:
    """A tiny target with a sharpened LM head: its next token depends on the context strongly
    enough for transfer layers to learn something in a second of training (a random model's
    near-uniform distributions would leave nothing to learn). Shared by the session: a test that
    changes it changes its own deep copy."""
    loaded = tiny_loaded(5, vocab_size=HT_VOCAB, num_layers=4)
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(10)
    return loaded


@pytest.fixture(scope="session")
def ht_trained(ht_target) -> Transfer:
    """Transfer layers for ``ht_target``, trained once a session; shared, so read-only: a service
    gets its own copy (``hidden_transfer_cluster``)."""
    return train(ht_target, ht_prompts(24, 8, 0), HT_LAYER, HT_K, 16, new_tokens=40, epochs=6,
                 lr=1e-2, progress=False)


def hidden_transfer_cluster(target: LoadedModel, transfer: Transfer) -> Cluster:
    """A target-only cluster serving hidden transfer. The target servicer moves the layers to its
    device and dtype in place, so it is handed a deep copy: the shared fixture stays as trained."""
    return Cluster(None, target, target_kw={"transfer": copy.deepcopy(transfer),
                                            "tree_nodes": 10})


@pytest.fixture(scope="module")
def transfer_cluster(ht_target, ht_trained):
    c = hidden_transfer_cluster(ht_target, ht_trained)
    yield c
    c.close()


def until_recovered(call, within_s: float, pause_s: float = 0.3):
    """Retry ``call`` while it fails with UNAVAILABLE, for at most ``within_s``; its result."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() < deadline, "no recovery after the service came back"
            time.sleep(pause_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_sessions(address: str, stub=pearl_pb2_grpc.DraftServiceStub) -> int:
    """The sessions a draft (default) or target service reports live (GetModelInfo)."""
    with grpc.insecure_channel(address) as ch:
        return stub(ch).GetModelInfo(pb.ModelInfoRequest(), timeout=5).live_sessions


def cluster_sessions(c: Cluster) -> tuple[int, int]:
    """(target, draft) live sessions of an in-process cluster (draft 0 when it has none)."""
    return (live_sessions(c.target_address, pearl_pb2_grpc.TargetServiceStub),
            0 if c.draft_address is None else live_sessions(c.draft_address))


def wait_until(cond, timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout_s} s")
        time.sleep(0.02)


def all_sessions_freed(c: Cluster, timeout_s: float = 5.0) -> None:
    """Wait until both services of ``c`` report no live session. Usually within 0.1 s; frees of
    up to ~17 s, about one run in eight on loaded cores, were cancels lost in asyncio.wait_for
    (test_reliability's test_a_cancel_meeting_an_answer_is_not_lost)."""
    wait_until(lambda: cluster_sessions(c) == (0, 0), timeout_s,
               "live_sessions == 0 on both services")


def health(address: str) -> int | None:
    """The health status ``address`` answers now, or None when it does not answer."""
    try:
        with grpc.insecure_channel(address) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=2).status
    except grpc.RpcError:
        return None
