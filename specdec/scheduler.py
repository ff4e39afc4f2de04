"""The engine's scheduler: which pending works the next step runs, and how long to wait first.

Policy only, like nano-vllm's Scheduler: pending works in, the next batch out; no threads, no
locks, no forward pass. The engine (specdec/engine.py) calls it under its condition variable,
and does the waiting, the forward pass and the futures itself.

    add(works)          a session's forward joins the queue
    coalescing_wait()   before a step: the sessions of the last step worth waiting for, and
                        for how long at most (``note_arrivals``, ``all_back`` while it waits)
    schedule()          the next step: works by ``Priority`` under the token budget, a long
                        prefill in chunks; the works of closed sessions and aborted ones dropped
    finish(step_s, t)   after the step: its time, and who took part (for the next wait)

Priority inside a step: a prefill left out of ``STARVE_STEPS`` steps in a row first (no
starvation), then verify windows (every session's critical path), then draft steps, then
prefills; first come, first served within a rank. A prefill longer than the step's token budget
(``max_batch_tokens``) is fed in chunks over several steps, so a long prompt never stalls the
others.

The coalescing wait (docs/design.md section 12): a step that starts with whatever is pending
lets sessions that take turns alternate for ever (a round trip through the coordinator between
two verifies, an event-loop hop between two draft steps). So before a step the engine waits for
the sessions of the last step that have not queued their next work yet: at most
min(``max_batch_wait_s``, ``WAIT_FRACTION`` of the recent step time), ended as soon as every one
of them has queued or closed, and only for sessions that usually come back within that time
(``Turnaround.on_time``). A session that does not come back is waited for once: it is not of the
step that follows.
"""

from __future__ import annotations

import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import threading

    import torch

    from specdec.batch_forward import Pseudo
    from specdec.sequence import PagedSequence

STARVE_STEPS = 4  # a prefill left out of this many steps in a row goes first
WAIT_FRACTION = 0.25  # the coalescing wait: at most this fraction of the recent step time,
STEP_EMA = 0.2  # an EMA of the step time with this weight,
ON_TIME_MIN = 0.2  # and only for sessions that came back within it this often (an EMA
ON_TIME_EMA = 0.25  # of "came back in time" with this weight)


class WorkKind(Enum):
    """What a work feeds."""

    VERIFY = "verify"  # a verify window or a Hidden Transfer tree
    DRAFT = "draft"  # a draft step
    PREFILL = "prefill"  # a prompt


class Rank(IntEnum):
    """A pending work's rank in the next step, the lowest first."""

    STARVED = 0  # a prefill left out of STARVE_STEPS steps in a row
    VERIFY = 1  # on every session's critical path
    DRAFT = 2
    PREFILL = 3


RANK = {WorkKind.VERIFY: Rank.VERIFY, WorkKind.DRAFT: Rank.DRAFT, WorkKind.PREFILL: Rank.PREFILL}


@dataclass(eq=False)
class Work:
    """One session's forward, waiting for (or in) a step."""

    seq: PagedSequence
    kind: WorkKind
    tokens: list[int]
    keep: list[int]  # token indices whose logits are wanted (into tokens, then pseudo tokens)
    rope: list[int] | None = None
    mask: torch.Tensor | None = None
    pseudo: Pseudo | None = None
    commit: bool = True  # advance the session's cached length by the tokens fed
    abort: threading.Event | None = None
    future: Future = field(default_factory=Future)
    submitted_ns: int = field(default_factory=time.perf_counter_ns)
    fed: int = 0  # tokens already fed (chunked prefill)
    forward_ns: int = 0  # time of the steps this work took part in
    waited: int = 0  # steps it was left out of


@dataclass(frozen=True, order=True)
class Priority:
    """A pending work's place in the order of the next step: by rank, then by arrival."""

    rank: Rank
    submitted_ns: int

    @classmethod
    def of(cls, w: Work) -> Priority:
        starved = w.kind is WorkKind.PREFILL and w.waited >= STARVE_STEPS
        return cls(Rank.STARVED if starved else RANK[w.kind], w.submitted_ns)


@dataclass
class Turnaround:
    """How a session comes back to the engine after its work is done (the coalescing wait)."""

    done_ns: int = 0  # when its last work ended
    away: bool = False  # its next work has not arrived yet
    on_time: float = 1.0  # EMA of "its next work came within the wait"


@dataclass
class Batch:
    """What the scheduler hands the engine for one step."""

    works: list[tuple[Work, int]]  # the works of the step and how many tokens each feeds
    closed: list[Work]  # dropped, their sessions closed: fail them, give their pages back
    aborted: list[Work]  # dropped, their abort set: fail them


@dataclass
class Wait:
    """A coalescing wait: at most ``budget_ns`` for ``expected`` to queue their next works."""

    budget_ns: int
    expected: list[PagedSequence]


class Scheduler:
    def __init__(self, max_batch_tokens: int, max_batch_wait_s: float):
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_wait_s = max(0.0, max_batch_wait_s)
        self.pending: list[Work] = []
        self.running: list[Work] = []  # the works of the step in progress
        self.step_s = 0.0  # EMA of the step time
        self.last: list[PagedSequence] = []  # the sessions whose work the last step finished
        self.turnarounds: weakref.WeakKeyDictionary[PagedSequence, Turnaround] = (
            weakref.WeakKeyDictionary())

    # -- the queue ---------------------------------------------------------------------------

    def add(self, works: list[Work]) -> None:
        self.pending.extend(works)

    def has_work(self, seq: PagedSequence) -> bool:
        """True while a work of ``seq`` is pending or in the step in progress."""
        return any(w.seq is seq for w in self.pending) or any(w.seq is seq for w in self.running)

    def withdraw(self, seq: PagedSequence) -> list[Work]:
        """Take a closing session's pending works out of the queue, but for one in a step."""
        gone = [w for w in self.pending if w.seq is seq and w not in self.running]
        self._remove(gone)
        return gone

    def discard(self, w: Work) -> None:
        """Take ``w`` out of the queue if it is there (a work that failed in its step)."""
        if w in self.pending:
            self.pending.remove(w)

    def clear(self) -> list[Work]:
        """Empty the queue (the engine closes); returns what was in it."""
        gone, self.pending = self.pending, []
        return gone

    def _remove(self, works: list[Work]) -> None:
        for w in works:
            self.pending.remove(w)

    # -- the steps ---------------------------------------------------------------------------

    def schedule(self) -> Batch:
        """The works of the next step, by priority under the token budget; the works of closed
        sessions and those whose abort is set leave the queue."""
        closed = [w for w in self.pending if w.seq.closing]
        self._remove(closed)
        aborted = [w for w in self.pending if w.abort is not None and w.abort.is_set()]
        self._remove(aborted)
        budget, works = self.max_batch_tokens, []
        for w in sorted(self.pending, key=Priority.of):
            n = left = len(w.tokens) - w.fed
            if w.kind is WorkKind.PREFILL and w.commit and left > budget:  # a chunk; the last one
                n = min(budget, left - len(w.keep))  # holds the kept positions
            if n <= 0 or (n > budget and works):
                w.waited += 1
                continue
            works.append((w, n))
            budget -= n
        self._remove([w for w, n in works if w.fed + n == len(w.tokens)])
        self.running = [w for w, _ in works]
        return Batch(works, closed, aborted)

    def finish(self, step_s: float, now_ns: int) -> list[PagedSequence]:
        """After a step of ``step_s`` seconds, ended at ``now_ns``: note the sessions whose work
        it finished, for the next wait. Returns those that closed meanwhile: their pages can go
        back now."""
        self.step_s += STEP_EMA * (step_s - self.step_s) if self.step_s else step_s
        self.last, closed = [], []
        for w in self.running:
            if not w.future.done():
                continue  # a prefill chunk: the work stays pending
            if w.seq.closing:
                closed.append(w.seq)
                continue
            t = self.turnarounds.setdefault(w.seq, Turnaround())
            t.done_ns, t.away = now_ns, True
            self.last.append(w.seq)
        self.running = []
        return closed

    # -- the coalescing wait -----------------------------------------------------------------

    def coalescing_wait(self) -> Wait | None:
        """Before a step: whom to wait for and how long at most; None to start it now. A lone
        session never waits (it is the one that queued), nor does a step whose queued tokens
        already fill the budget."""
        last, self.last = self.last, []
        if not self.max_batch_wait_s:
            return None
        budget = int(min(self.max_batch_wait_s, WAIT_FRACTION * self.step_s) * 1e9)
        self.note_arrivals(budget)
        expected = [s for s in last if self.turnarounds[s].away and not s.closing
                    and self.turnarounds[s].on_time >= ON_TIME_MIN]
        queued = sum(len(w.tokens) - w.fed for w in self.pending)
        if budget <= 0 or not expected or queued >= self.max_batch_tokens:
            return None
        return Wait(budget, expected)

    def note_arrivals(self, budget_ns: int) -> None:
        """Note the sessions whose next work has arrived, and whether it came within the wait."""
        for w in self.pending:
            t = self.turnarounds.get(w.seq)
            if t is not None and t.away:
                t.away = False
                t.on_time += ON_TIME_EMA * ((w.submitted_ns - t.done_ns <= budget_ns) - t.on_time)

    def all_back(self, wait: Wait) -> bool:
        """True when every session ``wait`` expects has queued its next work or closed."""
        return all(s.closing or not self.turnarounds[s].away for s in wait.expected)
