"""The compiled step's function (specdec/static_step.py) against the eager step
(specdec/batch_forward.py): the same logits for feeds of mixed widths, prefixes and kept positions,
the same K/V written, and padding that writes only the store's trash page, never a neighbour's.

The graph function runs uncompiled here (``compiled=False``), so the indexing, masking and
padding are checked in a second; tests/test_compiled.py runs it compiled through the services.
With ``buckets`` the CPU pads as a GPU does (feeds, widths and context rounded up)."""

import threading

import pytest
import torch

from specdec import batch_forward
from specdec.batch_forward import Feed
from specdec.kv_store import BlockTable
from specdec.models import tiny_model
from specdec.static_step import MAX_WIDTH, StaticStep

# (prefix length, new tokens, kept positions): decode feeds, verify windows, a feed that wants no
# logits, prefixes that end mid-page and on a page boundary (page size 16)
FEEDS = [(5, 1, [0]), (16, 4, [0, 1, 2, 3]), (33, 3, [2]), (1, 1, []), (47, 7, [0, 6])]


@pytest.fixture(scope="module")
def model():
    return tiny_model(11, num_layers=2, num_kv_heads=2)


def prefilled(store, model, lengths: list[int], seed: int) -> list[BlockTable]:
    """One session per length, its prompt's K/V in the store (eager prefill)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    sessions = []
    for n in lengths:
        s = BlockTable()
        store.reserve(s, n)
        batch_forward.forward(model, store, [Feed(s, torch.randint(1, vocab, (n,), generator=g)
                                                 .tolist(), [])])
        s.cached = n
        sessions.append(s)
    return sessions


def step_feeds(store, sessions: list[BlockTable], seed: int) -> list[Feed]:
    g = torch.Generator().manual_seed(seed)
    feeds = []
    for s, (_, n, keep) in zip(sessions, FEEDS):
        store.reserve(s, s.cached + n)
        feeds.append(Feed(s, torch.randint(1, 500, (n,), generator=g).tolist(), list(keep)))
    return feeds


def snapshot(store) -> list[torch.Tensor]:
    return [t.clone() for t in (*store.k, *store.v)]


def restore(store, saved: list[torch.Tensor]) -> None:
    for t, s in zip((*store.k, *store.v), saved):
        t.copy_(s)


@pytest.mark.parametrize("buckets", [False, True], ids=["exact shapes", "gpu buckets"])
def test_static_step_equals_the_eager_step(model, buckets):
    store = batch_forward.store_for(model, 512)
    neighbour = prefilled(store, model, [40], seed=1)[0]  # in the store, not in the step
    sessions = prefilled(store, model, [p for p, _, _ in FEEDS], seed=2)
    feeds = step_feeds(store, sessions, seed=3)
    before = snapshot(store)

    static = StaticStep(model, store, buckets=buckets, compiled=False)
    assert static.fits(feeds)
    static.forward(feeds)
    assert static.steps == 1
    got = [r.out for r in feeds]
    after_static = snapshot(store)

    restore(store, before)
    for r in feeds:
        r.out = None
    batch_forward.forward(model, store, feeds)
    for r, g, (_, n, keep) in zip(feeds, got, FEEDS):
        assert g.shape == (len(keep), model.config.vocab_size)
        torch.testing.assert_close(g, r.out, atol=1e-5, rtol=1e-5)

    # every K/V row outside the trash page is the eager step's: the written slots alike, and
    # everything else (the neighbour's pages, the feeds' prefixes, free pages) untouched
    ps = store.page_size
    live = slice(0, store.trash * ps)
    for s, e, b in zip(after_static, snapshot(store), before):
        torch.testing.assert_close(s[live], e[live], atol=1e-5, rtol=1e-5)
    written = torch.zeros(store.trash * ps, dtype=torch.bool)
    for r in feeds:
        written[store.rows(r.slots, torch.arange(r.slots.cached, r.slots.cached + len(r.tokens)))] = True
    for s, b in zip(after_static, before):
        assert torch.equal(s[live][~written], b[live][~written]), "padding wrote outside the trash"
    assert neighbour.cached == 40


def test_only_plain_short_feeds_take_the_static_step(model):
    store = batch_forward.store_for(model, 256)
    static = StaticStep(model, store, compiled=False)
    s = BlockTable()
    plain = Feed(s, [1] * MAX_WIDTH, [0])
    assert static.fits([plain])
    assert not static.fits([plain, Feed(s, [1] * (MAX_WIDTH + 1), [0])])  # a prefill chunk
    assert not static.fits([Feed(s, [1, 2], [0], mask=torch.ones(2, 2, dtype=torch.bool))])
    assert not static.fits([Feed(s, [1, 2], [0], rope=[0, 0])])  # a tree feed
    static.broken = RuntimeError("no backend")
    assert not static.fits([plain])


def test_a_feed_aborted_during_the_step_is_dropped_after_it(model):
    store = batch_forward.store_for(model, 256)
    a, b = prefilled(store, model, [8, 9], seed=4)
    stop = threading.Event()
    stop.set()
    feeds = [Feed(a, [3], [0], abort=stop), Feed(b, [4], [0])]
    for r in feeds:
        store.reserve(r.slots, r.slots.cached + 1)
    StaticStep(model, store, compiled=False).forward(feeds)
    assert feeds[0].aborted and feeds[0].out is None
    assert not feeds[1].aborted and feeds[1].out.shape == (1, model.config.vocab_size)
