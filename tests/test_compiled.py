"""Compiled engine steps (--compile on; docs/design.md section 12): the same greedy tokens as
the eager steps in float32, in every mode, through the services; the service says it compiled.

On a CPU the compiled functions take a minute or two to build, hence slow."""

import threading

import grpc
import pytest
import torch

from cluster import Cluster
from conftest import greedy_reference
from pearl.client import Client
from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.engine import Engine, EngineConfig, compile_steps
from specdec.models import tiny_model
from target_service.hidden_transfer.layers import Transfer, TransferLayers

pytestmark = pytest.mark.slow

PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], list(range(40, 100)), [7]]


def test_compiled_steps_equal_eager(tiny_draft, tiny_target):
    cfg = tiny_target.model.config
    layers = TransferLayers(cfg.hidden_size, 1, 2, 4).eval()
    c = Cluster(tiny_draft, tiny_target,
                target_kw=dict(transfer=Transfer(layers, "tiny"), tree_nodes=3,
                                           engine=EngineConfig(compile="on")))
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


def decode(engine: Engine, prompt: list[int], n: int, width: int) -> list[int]:
    """Greedy tokens of one session. With ``width`` > 1 each step is a verify window: the new
    token plus ``width - 1`` guesses (copies of it), of which only the first row is used; the
    guesses are rolled back (a length change) before the next step."""
    seq, out = engine.sequence(prompt), []
    logits = seq.forward().logits
    while len(out) < n:
        out.append(int(logits[-1].argmax()))
        seq.extend([out[-1]] * width)
        logits = seq.forward(keep=width).logits[:1]
        seq.truncate(len(seq.ids) - (width - 1))
    seq.close()
    return out


def sessions_at_once(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Every prompt decoded at once, a thread each (so steps batch them), widths 1, 4, 2, ..."""
    outs: list = [None] * len(prompts)

    def one(i: int) -> None:
        outs[i] = decode(engine, prompts[i], n, (1, 4, 2)[i % 3])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outs


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no GPU here: scripts/gpu_check.sh part a runs it"))])
def test_compiled_engine_equals_eager(device):
    """Engine level, float32: a compiled engine's greedy tokens are the eager engine's, for
    sessions alone and six at once, decode rows and verify windows mixed; on CUDA (CUDA graphs,
    buckets) as on the CPU."""
    model = tiny_model(3, num_layers=2).to(device)
    prompts = [[(7 * i + j) % 500 + 1 for j in range(5 + 11 * i)] for i in range(6)]
    eager, compiled = Engine(model, 2048), Engine(model, 2048, compile=True)
    try:
        assert compiled.warm_up() > 0 and compiled.compiled
        warmed = compiled.static.steps
        want = [decode(eager, p, 12, 1) for p in prompts]
        assert [decode(compiled, p, 12, 4) for p in prompts[:2]] == want[:2]
        assert sessions_at_once(compiled, prompts, 12) == want
        assert sessions_at_once(eager, prompts, 12) == want
        assert compiled.static.steps > warmed and compiled.compiled, compiled.static.broken
    finally:
        eager.close()
        compiled.close()


def test_compile_choice():
    assert compile_steps("auto", torch.device("cuda")) is True
    assert compile_steps("auto", torch.device("cpu")) is False
    assert compile_steps("on", torch.device("cpu")) is True
    assert compile_steps("off", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="compile must be one of"):
        compile_steps("maybe", torch.device("cpu"))
