"""The prefix cache (specdec/kv_store.py, specdec/engine.py): full prompt pages are kept after a
session and reused by the next session whose prompt starts with the same tokens.

Float32 tiny models. The cache must be invisible in the output: every request's tokens are the
same with it on and off, in all four modes, alone and batched, greedy and seeded, for prompts
that share a prefix and then differ, that end exactly on a page boundary, that are entirely
cached, and for a session that rolls back right after (and into) its cached prefix. Shared pages
are immutable, pages in use are never evicted, and a store too small for every cached page
evicts and still serves every request exactly.
"""

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from cluster import Cluster
from pearl.client import Client
from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.engine import Engine, EngineConfig
from specdec.kv_store import PAGE_SIZE as PS, BlockTable, KVStore
from specdec.sampling import Sampling
from specdec.sequence import HFSequence
from target_service.hidden_transfer.layers import Transfer, TransferLayers
from target_service.verifier import TargetSession

rng = random.Random(29)
SYSTEM = [rng.randrange(1, 512) for _ in range(45)]  # a shared prefix: 2 full pages and 13
BOUNDARY = SYSTEM[:2 * PS]  # a prefix that ends exactly on a page boundary
PROMPTS = ([SYSTEM + [rng.randrange(1, 512) for _ in range(n)] for n in (3, 11, 19, 30)]
           + [BOUNDARY + [rng.randrange(1, 512) for _ in range(n)] for n in (1, 7)]
           + [BOUNDARY, SYSTEM + [5] * 3])  # 32 and 48 tokens: whole pages only
MIX = [("ar", 0, None), ("sd", 3, None), ("pearl", 0, None), ("hidden-transfer", 0, None),
       ("pearl", 0, dict(temperature=1.0, seed=11)), ("sd", 2, dict(temperature=0.8, seed=5)),
       ("ar", 0, dict(temperature=1.0, top_p=0.9, seed=3)),
       ("hidden-transfer", 0, dict(temperature=0.9, seed=8))]
N = 20


# -- the store alone ------------------------------------------------------------------------------

def small_store(pages: int, prefix_cache: bool = True) -> KVStore:
    return KVStore(1, 1, 2, pages * PS, torch.float32, torch.device("cpu"),
                   prefix_cache=prefix_cache)


def filled(store: KVStore, ids: list[int]) -> BlockTable:
    """A session that looked ``ids`` up, then computed (here: wrote) the rest of them."""
    t = BlockTable()
    assert store.lookup(t, ids) is None
    start = t.cached
    store.reserve(t, len(ids))
    for s in range(start, len(ids)):  # K/V = the token id and its slot: checkable later
        at = store.row(t, s)
        store.k[0][at] = torch.tensor([[ids[s], s]], dtype=torch.float32)
    t.cached = len(ids)
    store.keep(t, ids)
    return t


def held(store: KVStore, t: BlockTable, ids: list[int]) -> None:
    """The session's K/V are those of its ids (nobody wrote over its pages)."""
    k = store.read(0, t, len(ids))[0][0]
    assert k[:, 0].tolist() == [float(i) for i in ids]
    assert k[:, 1].tolist() == [float(s) for s in range(len(ids))]


def test_a_prompt_reuses_the_full_pages_another_left():
    store = small_store(16)
    a = filled(store, PROMPTS[0])  # 48 tokens: 3 full pages
    pages = list(a.pages)
    store.release(a, PROMPTS[0])
    assert store.cached_tokens == 3 * PS and store.free_tokens == store.tokens
    b = filled(store, PROMPTS[2])  # the same 45-token prefix: its first 2 pages are cached
    assert b.pages[:2] == pages[:2]
    assert store.hit_tokens == 2 * PS
    held(store, b, PROMPTS[2])
    c = filled(store, PROMPTS[1])
    assert c.pages[:2] == b.pages[:2] and store.refs[b.pages[0]] == 2  # shared by reference
    held(store, c, PROMPTS[1])
    other = [t + 1 for t in PROMPTS[0]]  # a different first token: a different chain
    d = filled(store, other)
    assert not set(d.pages) & set(c.pages)
    for t, ids in ((b, PROMPTS[2]), (c, PROMPTS[1]), (d, other)):
        store.release(t, ids)
    assert not store.refs or max(store.refs.values()) == 0


def test_cached_pages_are_evicted_only_for_room_and_never_in_use():
    store = small_store(8)  # 128 slots
    keeper = filled(store, SYSTEM)  # holds 2 cached pages and a private one
    prompts = [[rng.randrange(1, 512) for _ in range(40)] for _ in range(6)]
    for p in prompts:  # each leaves 2 cached pages: far more than the store holds
        t = filled(store, p)
        held(store, t, p)
        held(store, keeper, SYSTEM)  # evictions never took a page in use
        store.release(t, p)
    assert store.cached_tokens <= store.tokens
    big = BlockTable()  # the cache never refuses what would fit without it
    store.reserve(big, store.tokens - len(keeper.pages) * PS)
    held(store, keeper, SYSTEM)
    store.release(big)
    store.release(keeper, SYSTEM)


def test_a_rollback_into_a_shared_page_writes_a_private_copy():
    store = small_store(8)
    a = filled(store, PROMPTS[0])
    b = filled(store, PROMPTS[1])  # shares a's 2 cached pages
    shared = b.pages[1]
    b.cached = 20  # roll back into the second page
    store.unshare(b, 20)
    assert b.pages[1] != shared and b.pages[0] == a.pages[0]
    store.write(0, b, 20, torch.full((4, 1, 2), -1.0), torch.zeros(4, 1, 2))
    held(store, a, PROMPTS[0])  # the neighbour's page is untouched
    assert store.read(0, b, 20)[0][0][:, 0].tolist() == [float(i) for i in PROMPTS[1][:20]]


def test_off_keeps_nothing():
    store = small_store(8, prefix_cache=False)
    a = filled(store, PROMPTS[0])
    store.release(a, PROMPTS[0])
    b = filled(store, PROMPTS[1])
    assert store.hit_tokens == 0 and store.cached_tokens == 0 and b.cached == len(PROMPTS[1])


# -- the engine ------------------------------------------------------------------------------------

def decode(engine: Engine, prompt: list[int], n: int, sampling: Sampling = Sampling()
           ) -> tuple[list[int], int]:
    """A target session deciding ``n`` tokens alone (ar); its tokens and its cached count."""
    s = TargetSession(engine, prompt, 10_000, sampling)
    try:
        first = s.start(True)
        out = [first.token_id]
        while len(out) < n:  # an empty window: the target's own next token (ar)
            out.append(s.verify(len(s.seq), [], [], True, False).token_id)
        return out, first.step.cached_tokens
    finally:
        s.close()


@pytest.fixture(scope="module")
def engines(tiny_target):
    on, off = Engine(tiny_target.model, 4096), Engine(tiny_target.model, 4096, prefix_cache=False)
    yield on, off
    on.close()
    off.close()


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.0, seed=4)])
def test_engine_tokens_are_the_same_with_the_cache(engines, sampling):
    on, off = engines
    for p in PROMPTS + PROMPTS[::-1]:  # the second time round every prompt is cached
        got, cached = decode(on, p, 8, sampling)
        assert got == decode(off, p, 8, sampling)[0]
        assert cached < len(p) and (cached % PS == 0 or cached == len(p) - 1)
    # 48 tokens, all cached: only the last one is fed again (into a copy of its page)
    assert decode(on, PROMPTS[7], 2)[1] == 3 * PS - 1


@torch.inference_mode()
def test_a_rollback_right_after_and_into_the_cached_prefix(engines, tiny_target):
    on, off = engines
    decode(on, PROMPTS[4], 2)  # caches BOUNDARY's 2 pages
    for keep in (len(BOUNDARY), len(BOUNDARY) - 5):  # at the boundary; inside a shared page
        seq = on.sequence(PROMPTS[4])
        f = seq.forward()
        assert f.reused == len(BOUNDARY)
        seq.truncate(keep)
        seq.extend([7, 8, 9])
        got = seq.forward(keep=3).logits
        ref = HFSequence(tiny_target.model, seq.ids).forward(keep=3).logits
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        seq.close()
    assert decode(on, PROMPTS[4], 4)[0] == decode(off, PROMPTS[4], 4)[0]  # cached pages intact


@torch.inference_mode()
def test_two_prefills_of_one_prefix_do_not_both_run(tiny_target):
    engine = Engine(tiny_target.model, 4096)
    slow = tiny_target.model.model.layers[0].mlp.register_forward_hook(
        lambda *a: time.sleep(0.2))
    try:
        prompt = SYSTEM + SYSTEM[:25]  # 70 tokens: 4 full pages
        out = {}

        def prefill(name: str, delay: float):
            time.sleep(delay)
            out[name] = engine.sequence(prompt).forward()

        threads = [threading.Thread(target=prefill, args=("a", 0)),
                   threading.Thread(target=prefill, args=("b", 0.05))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out["a"].reused == 0 and out["b"].reused == 4 * PS
        assert out["b"].input_tokens == len(prompt) - 4 * PS
        torch.testing.assert_close(out["a"].logits, out["b"].logits, atol=1e-5, rtol=1e-5)
    finally:
        slow.remove()
        engine.close()


def test_a_small_store_evicts_and_stays_exact(tiny_target):
    engine, ref = Engine(tiny_target.model, 160), Engine(tiny_target.model, 160,
                                                          prefix_cache=False)
    try:
        keeper = TargetSession(engine, PROMPTS[0], 10_000)  # in use throughout
        first = keeper.start(True)
        prompts = [[rng.randrange(1, 512) for _ in range(40)] for _ in range(5)]
        for p in prompts + PROMPTS[1:4] + prompts[::-1]:
            assert decode(engine, p, 6)[0] == decode(ref, p, 6)[0]
        assert engine.store.cached_tokens >= 2 * PS
        out = [first.token_id]  # the keeper's pages were never evicted under it
        while len(out) < 12:
            out.append(keeper.verify(len(keeper.seq), [], [], True, False).token_id)
        keeper.close()
        assert out == decode(ref, PROMPTS[0], 12)[0]
    finally:
        engine.close()
        ref.close()


# -- the services: all four modes -------------------------------------------------------------

def ht_kw(tiny_target, engine: EngineConfig) -> dict:
    cfg = tiny_target.model.config
    torch.manual_seed(0)
    layers = TransferLayers(cfg.hidden_size, 1, 2, 4).eval()
    return dict(transfer=Transfer(layers, "tiny"), tree_nodes=3, engine=engine)


@pytest.fixture(scope="module")
def clusters(tiny_draft, tiny_target):
    made = [Cluster(tiny_draft, tiny_target, target_kw=ht_kw(tiny_target, EngineConfig(
        prefix_cache=on)), draft_kw=dict(engine=EngineConfig(prefix_cache=on)))
        for on in (True, False)]
    yield made
    for c in made:
        c.close()


def run(client: Client, i: int, prompt: list[int]):
    mode, gamma, sampling = MIX[i % len(MIX)]
    r = client.complete(prompt, mode=mode, max_new_tokens=N, gamma=gamma, **(sampling or {}))
    return r.token_ids, r.stats


def test_every_mode_is_the_same_with_the_cache_alone_and_batched(clusters):
    on, off = clusters
    jobs = [(i, PROMPTS[i % len(PROMPTS)]) for i in range(len(MIX))]
    with Client(on.address, timeout_s=120) as c_on, Client(off.address, timeout_s=120) as c_off:
        ref = [run(c_off, i, p)[0] for i, p in jobs]
        alone = [run(c_on, i, p) for i, p in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda j: run(c_on, *j), jobs))
    for (i, p), r, (a, _), (t, stats) in zip(jobs, ref, alone, together):
        assert a == r and t == r, f"{MIX[i]} differs with the prefix cache"
        least = min(2 * PS, len(p) - 1)  # cached by the runs before (a whole prompt: less one)
        assert stats["cached_prompt_tokens"] >= least, MIX[i]
        if MIX[i][0] in ("sd", "pearl"):
            assert stats["draft_cached_prompt_tokens"] >= least
    assert all(s["cached_prompt_tokens"] == 0 for s in (run(Client(off.address), 0, SYSTEM)[1],))


def test_the_cache_is_reported(clusters):
    on, _ = clusters
    with Client(on.address, timeout_s=120) as c:
        c.complete(PROMPTS[3], mode="pearl", max_new_tokens=4)
    for address, stub in ((on.target_address, pearl_pb2_grpc.TargetServiceStub),
                          (on.draft_address, pearl_pb2_grpc.DraftServiceStub)):
        with grpc.insecure_channel(address) as ch:
            info = stub(ch).GetModelInfo(pb.ModelInfoRequest())
            load = pearl_pb2_grpc.LoadReportStub(ch).GetLoad(pb.LoadRequest())
        assert info.prefix_cache and info.kv_cached_tokens >= 2 * PS
        assert 0 < info.prefix_hit_tokens < info.prefix_lookup_tokens
        assert load.kv_cached_tokens == info.kv_cached_tokens
        assert load.kv_free_tokens == info.kv_free_tokens == info.kv_cache_tokens
