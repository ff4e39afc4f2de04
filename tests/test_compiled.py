"""Compiled engine steps (--compile on; docs/design.md section 12): the same greedy tokens as
the eager steps in float32, in every mode, through the services; the service says it compiled.

On a CPU the compiled functions take a minute or two to build, hence slow."""

import grpc
import pytest

from cluster import Cluster
from conftest import greedy_reference
from pearl.client import Client
from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.engine import compile_steps
from target_service.hidden_transfer.layers import Transfer, TransferLayers

pytestmark = pytest.mark.slow

PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], list(range(40, 100)), [7]]


def test_compiled_steps_equal_eager(tiny_draft, tiny_target):
    cfg = tiny_target.model.config
    layers = TransferLayers(cfg.hidden_size, 1, 2, 4).eval()
    c = Cluster(tiny_draft, tiny_target,
                target_kw=dict(transfer=Transfer(layers, "tiny"), tree_nodes=3, compile="on"))
    try:
        with grpc.insecure_channel(c.target_address) as ch:
            info = pearl_pb2_grpc.TargetServiceStub(ch).GetModelInfo(pb.ModelInfoRequest())
        assert info.compiled and info.engine == "batched"
        assert c.target.engine.compiled and not c.draft.engine.compiled
        static = c.target.engine.static
        warmed = static.steps
        assert warmed > 0, "the warm-up ran no compiled step"
        with Client(c.address, timeout_s=300) as cl:
            for prompt in PROMPTS:
                ref = greedy_reference(tiny_target, prompt, 20)
                for mode in ("ar", "sd", "pearl", "hidden-transfer"):
                    before = static.steps
                    got = cl.complete(prompt, mode=mode, max_new_tokens=20, gamma=3)
                    assert got.token_ids == ref, f"compiled {mode} diverged"
                    if mode != "hidden-transfer":  # tree rows run eagerly
                        assert static.steps > before, f"{mode} never took the compiled step"
        assert c.target.engine.compiled, f"the compiled step broke: {static.broken!r}"
    finally:
        c.close()


def test_compile_choice():
    import torch

    assert compile_steps("auto", torch.device("cuda")) is True
    assert compile_steps("auto", torch.device("cpu")) is False
    assert compile_steps("on", torch.device("cpu")) is True
    assert compile_steps("off", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="compile must be one of"):
        compile_steps("maybe", torch.device("cpu"))
