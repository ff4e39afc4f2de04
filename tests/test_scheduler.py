"""The engine's scheduler (specdec/scheduler.py) without threads, models or time: priority,
the token budget, chunked prefills, dropped works and the coalescing wait, driven step by step
the way the engine's loop drives it (docs/design.md section 12)."""

import threading

import pytest

from specdec.scheduler import (
    ON_TIME_MIN, STARVE_STEPS, Priority, Rank, Scheduler, Work, WorkKind)

VERIFY, DRAFT, PREFILL = WorkKind.VERIFY, WorkKind.DRAFT, WorkKind.PREFILL
MS = 1_000_000  # ns


class Session:
    """What the scheduler reads of a session: its identity and whether it is closing."""

    closing = False


def work(seq: Session, kind: WorkKind, n: int = 1, at: int = 0, keep: int = 1,
         **kw) -> Work:
    """A work of ``n`` tokens submitted at ``at`` ns, wanting the logits of its last ``keep``."""
    return Work(seq, kind, list(range(n)), list(range(n - keep, n)), submitted_ns=at, **kw)


def run(s: Scheduler, step_s: float = 0.1, now: int = 0) -> list[tuple[Work, int]]:
    """One step as the engine runs it: schedule, feed, post the finished works' results, finish."""
    batch = s.schedule()
    for w, n in batch.works:
        w.fed += n
        if w.fed == len(w.tokens):
            w.future.set_result(None)
    s.finish(step_s, now)
    return batch.works


def test_verify_then_draft_then_prefill_first_come_first_served():
    s = Scheduler(max_batch_tokens=100, max_batch_wait_s=0)
    a, b, c, d = Session(), Session(), Session(), Session()
    works = [work(a, PREFILL, 3, at=1), work(b, DRAFT, at=2), work(c, VERIFY, 2, at=4),
             work(d, VERIFY, 4, at=3)]
    s.add(works)
    taken = s.schedule().works
    assert [w for w, _ in taken] == [works[3], works[2], works[1], works[0]]
    assert [n for _, n in taken] == [4, 2, 1, 3]
    assert not s.pending and s.running == [w for w, _ in taken]


def test_priority_is_a_named_order():
    fresh = work(Session(), PREFILL, at=1)
    starved = work(Session(), PREFILL, at=9)
    starved.waited = STARVE_STEPS
    assert Priority.of(fresh) == Priority(Rank.PREFILL, 1)
    assert Priority.of(starved) == Priority(Rank.STARVED, 9)
    assert (Priority.of(starved) < Priority.of(work(Session(), VERIFY, at=0))
            < Priority.of(work(Session(), DRAFT, at=0)) < Priority.of(fresh))


def test_works_fill_the_token_budget_and_the_rest_wait():
    s = Scheduler(max_batch_tokens=8, max_batch_wait_s=0)
    big, small, late = work(Session(), VERIFY, 6, at=1), work(Session(), VERIFY, 3, at=2), \
        work(Session(), DRAFT, 2, at=3)
    s.add([big, small, late])
    taken = s.schedule().works
    assert taken == [(big, 6), (late, 2)]  # small does not fit the 2 tokens left; late does
    assert small.waited == 1 and s.pending == [small]


def test_a_work_larger_than_the_budget_runs_alone():
    s = Scheduler(max_batch_tokens=4, max_batch_wait_s=0)
    tree, step = work(Session(), VERIFY, 9, at=1), work(Session(), DRAFT, at=2)
    s.add([tree, step])
    assert run(s) == [(tree, 9)]
    assert run(s) == [(step, 1)]


def test_a_long_prefill_goes_in_chunks_and_the_last_holds_the_kept_positions():
    s = Scheduler(max_batch_tokens=8, max_batch_wait_s=0)
    prompt = work(Session(), PREFILL, 20, keep=3)
    s.add([prompt])
    chunks = []
    while s.pending:
        chunks += [n for _, n in run(s)]
    assert chunks == [8, 8, 4]
    s.add([work(Session(), PREFILL, 10, keep=5)])
    chunks = []
    while s.pending:
        chunks += [n for _, n in run(s)]
    assert chunks == [5, 5]  # 8 would leave a kept position to a later chunk


def test_a_tree_prefill_is_never_chunked():
    s = Scheduler(max_batch_tokens=4, max_batch_wait_s=0)
    tree = work(Session(), PREFILL, 9, commit=False)
    s.add([tree])
    assert run(s) == [(tree, 9)]


def test_decoding_sessions_share_a_step_with_a_chunked_prefill():
    s = Scheduler(max_batch_tokens=8, max_batch_wait_s=0)
    decoder, prompt = Session(), work(Session(), PREFILL, 30)
    s.add([prompt])
    for k in range(3):
        step = work(decoder, DRAFT, at=k + 1)
        s.add([step])
        taken = run(s)
        assert taken[0] == (step, 1) and taken[1][0] is prompt and taken[1][1] == 7


def test_a_prefill_left_out_goes_first_after_STARVE_STEPS_steps():
    s = Scheduler(max_batch_tokens=4, max_batch_wait_s=0)
    verifier, prompt = Session(), work(Session(), PREFILL, 10, at=0)
    s.add([prompt])
    for k in range(STARVE_STEPS):
        window = work(verifier, VERIFY, 4, at=k + 1)
        s.add([window])
        assert run(s) == [(window, 4)], f"step {k}: the verify window comes first"
    assert prompt.waited == STARVE_STEPS
    window = work(verifier, VERIFY, 4, at=99)
    s.add([window])
    assert run(s) == [(prompt, 4)]
    assert window.waited == 1


def test_closed_and_aborted_works_are_dropped():
    s = Scheduler(max_batch_tokens=100, max_batch_wait_s=0)
    gone, live = Session(), Session()
    gone.closing = True
    stop = threading.Event()
    stop.set()
    closed, aborted, kept = work(gone, VERIFY), work(live, DRAFT, abort=stop), work(live, VERIFY)
    s.add([closed, aborted, kept])
    batch = s.schedule()
    assert batch.closed == [closed] and batch.aborted == [aborted]
    assert batch.works == [(kept, 1)] and not s.pending


def test_a_closing_session_withdraws_its_works_but_not_one_in_a_step():
    s = Scheduler(max_batch_tokens=4, max_batch_wait_s=0)
    a, b = Session(), Session()
    prompt, step = work(a, PREFILL, 10), work(b, DRAFT)
    s.add([prompt])
    s.schedule()  # the prompt's first chunk is in the step; the work stays pending
    s.add([step])
    assert s.withdraw(a) == [] and s.has_work(a)
    assert s.withdraw(b) == [step] and not s.has_work(b)
    prompt.fed = 4
    a.closing = True
    assert s.finish(0.1, 0) == []  # the chunk's work is not done: its pages stay
    assert s.schedule().closed == [prompt] and not s.has_work(a)


def test_finish_hands_back_the_sessions_closed_during_the_step():
    s = Scheduler(max_batch_tokens=8, max_batch_wait_s=0)
    a, b = Session(), Session()
    s.add([work(a, VERIFY), work(b, VERIFY)])
    for w, _ in s.schedule().works:
        w.future.set_result(None)
    a.closing = True
    assert s.finish(0.1, 0) == [a]
    assert s.last == [b] and s.running == []


def test_the_step_time_is_an_ema():
    s = Scheduler(max_batch_tokens=8, max_batch_wait_s=0.01)
    s.finish(0.1, 0)
    assert s.step_s == pytest.approx(0.1)
    s.finish(0.2, 0)
    assert s.step_s == pytest.approx(0.12)


def two_sessions_after_a_step(wait_s: float = 0.5, step_s: float = 0.1
                              ) -> tuple[Scheduler, Session, Session]:
    """A scheduler whose last step ran a verify of A and of B, ended at t = 1000 ms."""
    s = Scheduler(max_batch_tokens=64, max_batch_wait_s=wait_s)
    a, b = Session(), Session()
    s.add([work(a, VERIFY, at=0), work(b, VERIFY, at=0)])
    run(s, step_s, now=1000 * MS)
    return s, a, b


def test_no_wait_when_it_is_off_or_before_the_first_step():
    s, a, _ = two_sessions_after_a_step(wait_s=0)
    s.add([work(a, VERIFY, at=1001 * MS)])
    assert s.coalescing_wait() is None
    s, a, _ = two_sessions_after_a_step(step_s=0.0)  # no step time measured yet
    s.add([work(a, VERIFY, at=1001 * MS)])
    assert s.coalescing_wait() is None


def test_the_wait_is_for_the_last_steps_sessions_still_away():
    s, a, b = two_sessions_after_a_step(wait_s=0.5, step_s=0.1)
    s.add([work(a, VERIFY, at=1001 * MS)])
    wait = s.coalescing_wait()
    assert wait.expected == [b]
    assert wait.budget_ns == 25 * MS  # a quarter of the step time, under the flag's 500 ms
    assert not s.all_back(wait)
    s.add([work(b, VERIFY, at=1002 * MS)])
    s.note_arrivals(wait.budget_ns)
    assert s.all_back(wait)
    assert s.turnarounds[b].on_time == 1.0  # it came back in time


def test_the_flag_caps_the_wait():
    s, a, _ = two_sessions_after_a_step(wait_s=0.004, step_s=0.1)
    s.add([work(a, VERIFY, at=1001 * MS)])
    assert s.coalescing_wait().budget_ns == 4 * MS


def test_a_lone_session_never_waits():
    s = Scheduler(max_batch_tokens=64, max_batch_wait_s=0.5)
    a = Session()
    s.add([work(a, VERIFY)])
    run(s, 0.1, now=1000 * MS)
    s.add([work(a, VERIFY, at=1001 * MS)])
    assert s.coalescing_wait() is None


def test_no_wait_when_the_queue_fills_the_budget():
    s, a, _ = two_sessions_after_a_step()
    s.add([work(a, VERIFY, 64, at=1001 * MS)])
    assert s.coalescing_wait() is None


def test_a_closing_session_is_not_waited_for():
    s, a, b = two_sessions_after_a_step()
    b.closing = True
    s.add([work(a, VERIFY, at=1001 * MS)])
    assert s.coalescing_wait() is None
    s, a, b = two_sessions_after_a_step()
    s.add([work(a, VERIFY, at=1001 * MS)])
    wait = s.coalescing_wait()
    b.closing = True  # while the engine waits
    assert s.all_back(wait)


def test_a_session_that_does_not_come_back_is_waited_for_once():
    s, a, b = two_sessions_after_a_step()
    s.add([work(a, VERIFY, at=1001 * MS)])
    assert s.coalescing_wait().expected == [b]  # the wait times out: B never queues
    run(s, 0.1, now=1200 * MS)  # A's step alone
    s.add([work(a, VERIFY, at=1201 * MS)])
    assert s.coalescing_wait() is None, "B was not of the step that followed"


def test_a_session_that_comes_back_late_stops_being_waited_for():
    """Each late return (after the budget) lowers its on-time EMA; below ON_TIME_MIN it is not
    expected any more (a pearl verify whose next window needs several draft steps)."""
    s, a, b = two_sessions_after_a_step()
    now, rounds = 1000 * MS, 0
    while True:
        s.add([work(a, VERIFY, at=now + 1 * MS)])
        wait = s.coalescing_wait()
        if wait is None:
            break
        assert wait.expected == [b]
        s.add([work(b, VERIFY, at=now + wait.budget_ns + 1)])  # just too late
        s.note_arrivals(wait.budget_ns)
        now += 200 * MS
        run(s, 0.1, now=now)
        rounds += 1
    assert s.turnarounds[b].on_time < ON_TIME_MIN
    assert rounds == 6  # 1.0 * 0.75^6 = 0.18 < 0.2 <= 0.75^5
