import os
import sys
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, os.path.dirname(__file__))

from cluster import Cluster  # noqa: E402
from specdec.models import LoadedModel, noisy_copy, tiny_loaded  # noqa: E402, F401

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


def health(address: str) -> int | None:
    """The health status ``address`` answers now, or None when it does not answer."""
    try:
        with grpc.insecure_channel(address) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=2).status
    except grpc.RpcError:
        return None
