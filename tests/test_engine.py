"""The batching engine (specdec/engine.py): many sessions in one forward per step, and nothing
of that shows in any session's output (docs/design.md, the engine).

Float32 tiny models: a request's tokens are identical alone and among others of mixed prompt
lengths, modes and sampling settings; chunked prefill equals one pass; a full KV store refuses a
session without touching its neighbours; a session closed mid-step keeps its pages until the step
ends; cancellations, rollbacks and protocol errors of some sessions leave the others exact.
"""

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from cluster import Cluster
from conftest import greedy_reference
from pearl.client import Client
from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.engine import Engine, EngineConfig
from specdec.kv_store import StoreFull
from specdec.sequence import HFSequence
from target_service.hidden_transfer.layers import Transfer, TransferLayers

rng = random.Random(7)
PROMPTS = [[rng.randrange(1, 512) for _ in range(n)] for n in (1, 3, 9, 17, 30, 44, 61, 70)]
# (mode, gamma, sampling): every mode, greedy and seeded sampling, fixed and adaptive windows
MIX = [("ar", 0, None), ("sd", 3, None), ("pearl", 0, None), ("hidden-transfer", 0, None),
       ("pearl", 0, dict(temperature=1.0, seed=11)), ("sd", 2, dict(temperature=0.8, top_k=20,
                                                                    seed=5)),
       ("ar", 0, dict(temperature=1.0, top_p=0.9, seed=3)), ("pearl", 5, None)]
N = 24


@pytest.fixture(scope="module")
def ht_cluster(tiny_draft, tiny_target):
    """Draft + target with (untrained, copy-forward) transfer layers: all four modes."""
    cfg = tiny_target.model.config
    layers = TransferLayers(cfg.hidden_size, 1, 2, 4).eval()
    c = Cluster(tiny_draft, tiny_target,
                target_kw=dict(transfer=Transfer(layers, "tiny"), tree_nodes=3))
    yield c
    c.close()


def run(client: Client, i: int):
    mode, gamma, sampling = MIX[i % len(MIX)]
    r = client.complete(PROMPTS[i % len(PROMPTS)], mode=mode, max_new_tokens=N, gamma=gamma,
                        **(sampling or {}))
    return r.token_ids, r.stats


def test_tokens_do_not_depend_on_batch_mates(ht_cluster, tiny_target):
    target_engine = ht_cluster.target.engine
    with Client(ht_cluster.address, timeout_s=120) as c:
        alone = [run(c, i)[0] for i in range(len(MIX))]
        for i, (mode, _, sampling) in enumerate(MIX):  # greedy alone is the target's own
            if sampling is None:
                assert alone[i] == greedy_reference(tiny_target, PROMPTS[i], N), mode
        before = target_engine.steps_by_sessions.copy()
        for together in (2, 5, 8):
            with ThreadPoolExecutor(together) as pool:
                got = list(pool.map(lambda i: run(c, i), range(together)))
            for i, (ids, stats) in enumerate(got):
                assert ids == alone[i], f"request {i} ({MIX[i]}) changed among {together}"
                if MIX[i][0] in ("sd", "pearl"):
                    assert stats["draft_tokens"] > 0 and not stats["fell_back"]
    batched = target_engine.steps_by_sessions - before
    assert max(batched) >= 3, f"the target never batched several sessions: {batched}"
    assert ht_cluster.draft.engine.steps_by_sessions.keys() - {1}, "the draft never batched"


def test_seeded_sampling_repeats_alone_and_batched(ht_cluster):
    with Client(ht_cluster.address, timeout_s=120) as c:
        req = dict(mode="pearl", max_new_tokens=N, temperature=1.0, seed=99)
        alone = c.complete(PROMPTS[3], **req).token_ids
        with ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(lambda _: c.complete(PROMPTS[3], **req).token_ids, range(6)))
    assert all(o == alone for o in outs)


@torch.inference_mode()
def test_chunked_prefill_equals_one_pass(tiny_target):
    model = tiny_target.model
    engine = Engine(model, 4096, max_batch_tokens=8)
    try:
        long, short = PROMPTS[7], PROMPTS[2]
        decode = engine.sequence(short)
        decode.forward()
        results, steps0 = {}, engine.steps

        def prefill():
            results["long"] = engine.sequence(long).forward(keep=3)

        t = threading.Thread(target=prefill)
        t.start()
        for k in range(4):  # a decode session keeps stepping while the prompt goes in chunks
            decode.extend([k + 1])
            results[k] = decode.forward()
        t.join()
        ref = HFSequence(model, long).forward(keep=3).logits
        torch.testing.assert_close(results["long"].logits, ref, atol=1e-5, rtol=1e-5)
        assert engine.steps - steps0 >= len(long) // 8, "the prompt was not chunked"
        dref = HFSequence(model, decode.ids).forward().logits  # the decode session's last
        torch.testing.assert_close(results[3].logits, dref, atol=1e-5, rtol=1e-5)
    finally:
        engine.close()


def test_full_store_refuses_and_spares_neighbours(tiny_draft, tiny_target):
    c = Cluster(tiny_draft, tiny_target, target_kw=dict(engine=EngineConfig(kv_cache_tokens=128)),
                draft_kw=dict(engine=EngineConfig(kv_cache_tokens=128)))
    try:
        with Client(c.address, timeout_s=120) as cl:
            prompt = PROMPTS[6]  # 61 tokens + 40 new: most of the 128 slots
            ref = greedy_reference(tiny_target, prompt, 40)
            big = cl.generate(prompt, mode="ar", max_new_tokens=40)
            first = next(big)  # the big session holds its pages now
            with pytest.raises(grpc.RpcError) as e:
                cl.complete(PROMPTS[7], mode="ar", max_new_tokens=40)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "KV store full" in e.value.details()
            *_, result = big
            assert first.token_ids + result.token_ids[len(first.token_ids):] == ref
            assert result.token_ids == ref
            time.sleep(0.2)
            store = c.target.engine.store
            assert store.free_tokens == store.tokens, "pages not given back"
            assert cl.complete(PROMPTS[7], mode="ar", max_new_tokens=8).token_ids
    finally:
        c.close()


@torch.inference_mode()
def test_close_mid_step_keeps_pages_until_the_step_ends(tiny_target):
    model = tiny_target.model
    engine = Engine(model, 1024)
    slow = model.model.layers[0].mlp.register_forward_hook(lambda *a: time.sleep(0.5))
    try:
        seq = engine.sequence(PROMPTS[5])
        t = threading.Thread(target=_swallow(seq.forward))
        t.start()
        time.sleep(0.2)  # inside the step now
        held = engine.store.tokens - engine.store.free_tokens
        assert held >= len(PROMPTS[5])
        seq.close()
        assert engine.store.tokens - engine.store.free_tokens == held, "freed under a step"
        t.join()
        assert engine.store.free_tokens == engine.store.tokens
    finally:
        slow.remove()
        engine.close()


def _swallow(fn):
    def go():
        try:
            fn()
        except Exception:
            pass
    return go


def test_store_full_is_a_clear_error(tiny_target):
    engine = Engine(tiny_target.model, 32)
    try:
        with pytest.raises(StoreFull, match="KV store full"):
            engine.sequence(PROMPTS[7])  # 70 tokens in 32 slots
    finally:
        engine.close()


def test_faults_of_some_sessions_leave_the_others_exact(ht_cluster, tiny_target):
    """Cancelled requests, protocol errors and rollbacks interleaved with exact ones."""
    prompt = PROMPTS[4]
    ref = greedy_reference(tiny_target, prompt, 40)
    stop = threading.Event()

    def disturb():
        with grpc.insecure_channel(ht_cluster.address) as cc, \
                grpc.insecure_channel(ht_cluster.target_address) as tc:
            coordinator = pearl_pb2_grpc.CoordinatorStub(cc)
            target = pearl_pb2_grpc.TargetServiceStub(tc)
            k = 0
            while not stop.is_set():
                k += 1
                call = coordinator.Generate(pb.GenerateRequest(
                    prompt_ids=PROMPTS[k % 8], mode=(pb.MODE_PEARL, pb.MODE_SD, pb.MODE_AR)[k % 3],
                    max_new_tokens=30))
                for j, _ in enumerate(call):
                    if j == 2:
                        call.cancel()  # cancelled mid-request: its sessions go, others stay
                        break
                bad = iter([pb.VerifyRequest(start=pb.VerifyStart(prompt_ids=PROMPTS[k % 8],
                                                                  first_token=True)),
                            pb.VerifyRequest(window=pb.VerifyWindow(position=999))])
                with pytest.raises(grpc.RpcError) as e:
                    list(target.Verify(bad))
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with ThreadPoolExecutor(3) as pool:
        noise = [pool.submit(disturb) for _ in range(2)]
        with Client(ht_cluster.address, timeout_s=120) as c:
            outs = [c.complete(prompt, mode=m, max_new_tokens=40).token_ids
                    for m in ("pearl", "sd", "ar", "hidden-transfer", "pearl")]
        stop.set()
        for f in noise:
            f.result()
    assert all(o == ref for o in outs)
    deadline = time.monotonic() + 5
    for engine in (ht_cluster.target.engine, ht_cluster.draft.engine):
        while engine.store.free_tokens != engine.store.tokens and time.monotonic() < deadline:
            time.sleep(0.1)
        assert engine.store.free_tokens == engine.store.tokens, "a session's pages leaked"
