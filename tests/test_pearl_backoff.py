"""pearl with speculation off under load (coordinator/schedule.py Pearl, docs/design.md section
4): when the adaptive window is 0 the session decodes as ar, the draft is parked (no horizon
pushed, its proposals in flight stale), and when the window comes back the draft is brought up
to the committed sequence and drafts again. The state machine alone with fake links, then end
to end on tiny models: the output is the target's, greedy and seeded."""

import asyncio
import time

import pytest
import torch

from cluster import Cluster
from conftest import greedy_reference
from coordinator.links import DraftLink, Event
from coordinator.output import Output
from coordinator.request import Plan, Request
from coordinator.schedule import Pearl
from coordinator.timing import Timing
from pearl.client import Client
from specdec.models import noisy_copy, tiny_loaded, tiny_tokenizer
from specdec.stats import Recorder
from test_pearl import SAMPLING, FakeLink, proposal, verdict

L = 4
PROMPT = [1, 2, 3, 4]


class Set(Timing):
    """A Timing whose window the test sets (measurements still go in, unused)."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def gamma(self, gamma_max: int, may_stop: bool = True) -> int:
        return self.window if may_stop else max(self.window, 1)


def start(timing: Timing):
    events = asyncio.Queue()
    draft, target = FakeLink(), FakeLink()
    plan = Plan("s", PROMPT, max_new_tokens=50, max_positions=1000, sampling=SAMPLING)  # adaptive
    rec = Recorder("pearl", L)
    p = Pearl(Request(plan, target, draft, events, Output(tiny_tokenizer(), 50, [], []), rec,
                      timing))
    task = asyncio.create_task(p.run())
    put = lambda src, msg: events.put_nowait(Event(src, msg, time.monotonic_ns()))
    return p, draft, target, rec, task, put


def settle():
    return asyncio.sleep(0.01)


def ar_window(position):  # what an empty window with a bonus asks
    return ("verify", position, [], [], 0, "ar", True, False)


def test_window_0_parks_the_draft_and_its_return_resynchronises_it():
    async def scenario():
        timing = Set(3)
        p, draft, target, rec, task, put = start(timing)
        await settle()
        assert draft.calls[0] == ("start", "s", PROMPT, 1, L + 3, SAMPLING)
        put("target", verdict(L, 0, 0, phase="start"))
        put("draft", proposal(1, L, 50))
        await settle()
        assert target.calls[-1] == ("verify", L, [50], [None], 1, "held", False, True)
        assert draft.calls[-1] == ("extend", 2, L + 4)
        put("draft", proposal(1, L + 1, 51))
        timing.window = 0  # the load rises
        put("target", verdict(L, 1, 1, phase="held"))  # 50 accepted: post, but the window is 0
        await settle()
        assert p.phase == "off"
        # parked: the draft keeps what is committed and has nothing left to draft
        assert draft.calls[-1] == ("rollback", L + 1, [], 3, L + 1)
        parked = len(draft.calls)
        # as ar: an empty window, the target feeds 50 and chooses the next token itself
        assert target.calls[-1] == ar_window(L + 1)
        put("draft", proposal(2, L + 2, 52))  # drafted before the park: stale
        put("target", verdict(L + 1, 0, 0, 70, phase="ar"))
        await settle()
        assert target.calls[-1] == ar_window(L + 2) and rec.stale == 1
        put("target", verdict(L + 2, 0, 0, 71, phase="ar"))
        await settle()
        assert target.calls[-1] == ar_window(L + 3)
        assert len(draft.calls) == parked, "nothing goes to the draft while the window is 0"
        timing.window = 2  # the load falls
        put("target", verdict(L + 3, 0, 0, 72, phase="ar"))
        await settle()
        assert p.r.committed[L:] == [50, 70, 71, 72]
        # the draft takes the tokens committed meanwhile and drafts a new run from there; the
        # target's 72 is fed with the draft's first token (pre)
        assert draft.calls[parked:] == [("rollback", L + 1, [70, 71, 72], 4, L + 6)]
        assert p.phase == "pre" and target.calls[-1] == ar_window(L + 3)
        put("draft", proposal(4, L + 4, 80))
        await settle()
        assert target.calls[-1] == ("verify", L + 4, [80], [None], 4, "pre", False, False)
        assert draft.calls[-1] == ("extend", 5, L + 7)
        assert rec.gammas == [3, 3, 0, 0, 0, 2, 2] and p.off_windows == 3
        task.cancel()

    asyncio.run(scenario())


def test_a_rejection_when_the_window_is_0_takes_the_correction_and_parks():
    async def scenario():
        timing = Set(3)
        p, draft, target, rec, task, put = start(timing)
        put("target", verdict(L, 0, 0, phase="start"))
        put("draft", proposal(1, L, 50))
        await settle()
        timing.window = 0
        put("target", verdict(L, 1, 0, 99, phase="held"))  # 50 rejected, correction 99
        await settle()
        # one message: the correction appended, nothing to draft
        assert draft.calls[-1] == ("rollback", L, [99], 3, L + 1) and p.phase == "off"
        assert target.calls[-1] == ar_window(L + 1)
        timing.window = 3
        put("target", verdict(L + 1, 0, 0, 70, phase="ar"))
        await settle()
        assert draft.calls[-1] == ("rollback", L + 1, [70], 4, L + 5)
        assert p.phase == "pre"
        task.cancel()

    asyncio.run(scenario())


def test_a_request_that_starts_off_answers_from_the_held_distribution():
    async def scenario():
        timing = Set(0)  # off already when the request comes
        p, draft, target, rec, task, put = start(timing)
        await settle()
        assert draft.calls == [("start", "s", PROMPT, 1, L, SAMPLING)]  # nothing to draft
        put("target", verdict(L, 0, 0, phase="start"))
        await settle()
        # the target holds the distribution of L: the empty window is answered from it
        assert target.calls[-1] == ar_window(L)
        put("target", verdict(L, 0, 0, 60, phase="held"))  # no forward pass
        await settle()
        assert target.calls[-1] == ar_window(L + 1)
        timing.window = 2
        put("target", verdict(L + 1, 0, 0, 61, phase="ar"))
        await settle()
        assert draft.calls[-1] == ("rollback", L, [60, 61], 2, L + 4) and p.phase == "pre"
        assert p.r.committed[L:] == [60, 61]
        task.cancel()

    asyncio.run(scenario())


def test_on_again_before_any_empty_window_judges_with_the_held_distribution():
    async def scenario():
        timing = Set(0)
        p, draft, target, rec, task, put = start(timing)
        await settle()
        timing.window = 3  # back before the prefill's verdict: the target holds L's distribution
        put("target", verdict(L, 0, 0, phase="start"))
        await settle()
        assert draft.calls[-1] == ("rollback", L, [], 2, L + 3) and p.phase == "held"
        assert len(target.calls) == 1
        put("draft", proposal(2, L, 50))
        await settle()
        assert target.calls[-1] == ("verify", L, [50], [None], 2, "held", False, True)
        task.cancel()

    asyncio.run(scenario())


# -- end to end: tiny models over real gRPC -------------------------------------------------------


class OffBetween(Timing):
    """The measured Timing, but the window is 0 while the count of target forward verdicts is
    in [lo, hi) and 3 otherwise: speculation goes off mid-request and comes back."""

    def __init__(self, lo: int, hi: int):
        super().__init__()
        self.lo, self.hi, self.forwards = lo, hi, 0

    def verify(self, forward_ns: int, batch_tokens: int = 0, batch_rows: int = 0) -> None:
        super().verify(forward_ns, batch_tokens, batch_rows)
        self.forwards += 1

    def gamma(self, gamma_max: int, may_stop: bool = True) -> int:
        return 0 if may_stop and self.lo <= self.forwards < self.hi else 3


@pytest.fixture(scope="module")
def pair():
    """A target that is not nearly uniform (so that seeded sampling agrees with its draft at
    times) and a noisy draft of it."""
    target = tiny_loaded(11, vocab_size=24)
    with torch.no_grad():
        target.model.lm_head.weight.mul_(6)
    return noisy_copy(target, 5, 0.3), target


@pytest.fixture(scope="module")
def backoff(pair):
    c = Cluster(*pair)
    yield c
    c.close()


@pytest.fixture
def logged(monkeypatch):
    """Every window the coordinator asks the target for, and every message that moves the
    draft, in order: ("ask", committed length, phase), ("extend",), ("rollback", keep,
    appended ids)."""
    log = []
    ask, extend, rollback = Request.ask, DraftLink.extend, DraftLink.rollback

    async def logged_ask(self, draft_ids, qs, window_id, phase, *a, **kw):
        log.append(("ask", len(self.committed), phase))
        await ask(self, draft_ids, qs, window_id, phase, *a, **kw)

    async def logged_extend(self, window_id, draft_until):
        log.append(("extend",))
        await extend(self, window_id, draft_until)

    async def logged_rollback(self, keep, append_ids, window_id, draft_until):
        log.append(("rollback", keep, list(append_ids)))
        await rollback(self, keep, append_ids, window_id, draft_until)

    monkeypatch.setattr(Request, "ask", logged_ask)
    monkeypatch.setattr(DraftLink, "extend", logged_extend)
    monkeypatch.setattr(DraftLink, "rollback", logged_rollback)
    return log


def off_windows(log) -> list[int]:
    """Indices in ``log`` of the empty windows asked with speculation off."""
    return [i for i, e in enumerate(log) if e[0] == "ask" and e[2] == "ar"]


def run(c: Cluster, timing: Timing, prompt: list[int], n: int, **kw):
    c.coordinator.timing = timing
    try:
        with Client(c.address, timeout_s=120) as cl:
            return cl.complete(prompt, mode="pearl", max_new_tokens=n, ignore_eos=True, **kw)
    finally:
        c.coordinator.timing = Timing()


def test_greedy_output_is_the_targets_through_off_and_on(backoff, pair, logged):
    prompt = [3, 17, 5, 9, 2, 11]
    n = 40
    r = run(backoff, OffBetween(4, 14), prompt, n, logprobs=True, top_logprobs=2)
    log = list(logged)  # this request's; ar's windows below are logged too
    assert r.token_ids == greedy_reference(pair[1], prompt, n)
    with Client(backoff.address, timeout_s=120) as cl:  # and the logprobs ar reports
        ar = cl.complete(prompt, mode="ar", max_new_tokens=n, ignore_eos=True, logprobs=True,
                         top_logprobs=2)
    assert [t.token_id for t in r.logprobs] == r.token_ids
    assert [t.logprob for t in r.logprobs] == pytest.approx([t.logprob for t in ar.logprobs],
                                                            abs=1e-4)
    s = r.stats
    g = s["gamma_history"]
    zeros = [i for i, w in enumerate(g) if w == 0]
    assert len(zeros) >= 5 and zeros[0] > 0 and zeros[-1] < len(g) - 1, g
    assert all(w == 0 for w in g[zeros[0]:zeros[-1] + 1]), g  # one off period, mid-request
    assert not s["fell_back"] and s["draft_tokens"] > 0
    # one empty window per 0, each at the next position: each commits the target's own token
    off = off_windows(log)
    first, last = off[0], off[-1]
    at = [log[i][1] for i in off]
    assert len(off) == len(zeros) and at == list(range(at[0], at[0] + len(at))), at
    # the draft: parked just before the first empty window (it keeps every committed token
    # and drafts nothing), told nothing while off, then brought up to the committed sequence:
    # the tokens committed since the park appended, a new run from there
    park, resume = log[first - 1], log[last + 1]
    assert park[0] == "rollback" and park[1] + len(park[2]) == at[0], (park, at)
    assert all(e[0] == "ask" and e[2] == "ar" for e in log[first:last + 1])
    committed = prompt + r.token_ids
    assert resume == ("rollback", at[0], committed[at[0]:at[-1] + 1]), (resume, at)
    assert "extend" in {e[0] for e in log[last + 2:]}  # drafting again


def test_a_sampled_request_keeps_speculating_so_its_seed_repeats(backoff, logged):
    """Sampling with a seed: positions decided while off would be drawn by ar's rule, so the
    tokens would depend on when the load turned speculation off. A sampled session keeps its
    window: the same text as with speculation on throughout."""
    prompt = [3, 17, 5, 9]
    n = 36
    kw = dict(temperature=1.0, seed=7)
    r = run(backoff, OffBetween(6, 16), prompt, n, **kw)
    assert not off_windows(logged) and 0 not in r.stats["gamma_history"]
    assert not r.stats["fell_back"] and 0 < r.stats["accepted_tokens"]
    assert r.token_ids == run(backoff, OffBetween(0, 0), prompt, n, **kw).token_ids
