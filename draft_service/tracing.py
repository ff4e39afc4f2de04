"""The draft service's traces: a ``draft.window`` span per window, and its forward-pass metrics.

A span covers one draft window that drafted at least one token, from the start of its first
forward pass to the end of its last; the window's fate (``accepted``, ``cut`` at
``pearl.cut_at``, ``stale``, or ``ended`` when the session closed before a rollback judged it),
the exact forward passes as integer lists (starts, durations, engine batch sizes, queue waits),
and a ``rollback`` event. Spans join the request's trace through ``DraftStart.trace_context``.
Set-up, exporters and instruments: specdec/telemetry.py; reading the spans: docs/tracing.md.
"""

import time
from dataclasses import dataclass, field

from specdec.telemetry import Telemetry, extract_context


@dataclass
class _Window:
    id: int
    start: int  # first position
    goal: int  # the sequence length the window drafts up to
    starts: list[int] = field(default_factory=list)  # forward passes: wall-clock start (ns)
    durations: list[int] = field(default_factory=list)  # and duration (ns)
    input_tokens: int = 0
    batch_rows: list[int] = field(default_factory=list)  # engine step sizes of those passes
    queue_ns: list[int] = field(default_factory=list)  # and their waits for the step


class DraftTrace:
    """Follows one draft stream's windows from its control messages and proposals, and emits a
    ``draft.window`` span per window once its fate is known."""

    def __init__(self, tel: Telemetry, start):
        self.tel = tel
        self.ctx = extract_context(start.trace_context) if tel.tracing else None
        self.session = start.session_id
        self.windows: list[_Window] = []
        self.goal = 0
        self._open(start.window_id, len(start.prompt_ids), start.draft_until)
        if tel.metrics is not None:
            tel.metrics.active_sessions.add(1)

    def _open(self, wid: int, start: int, goal: int) -> None:
        self.windows.append(_Window(wid, start, goal))
        self.goal = goal

    def request(self, req) -> None:
        """A control message after start (extend, rollback) was applied."""
        kind = req.WhichOneof("kind")
        if kind == "extend":
            self._open(req.extend.window_id, self.goal, req.extend.draft_until)
        elif kind == "rollback":
            r = req.rollback
            now = time.time_ns()
            spans = self._close_all(r.keep)
            if spans:  # the event goes on the window the rejection cut (or the last one)
                cut = next((s for s, fate, _ in spans if fate != "accepted"), spans[-1][0])
                cut.add_event("rollback", {"pearl.keep": r.keep,
                                           "pearl.appended": len(r.append_ids),
                                           "pearl.next_window_id": r.window_id}, timestamp=now)
            for s, _, end in spans:
                s.end(end_time=end)
            self._open(r.window_id, r.keep + len(r.append_ids), r.draft_until)

    def proposal(self, p) -> None:
        """A drafted token (a ``specdec.answers.Proposal``), after its forward pass."""
        step = p.step
        if self.tel.metrics is not None:
            self.tel.metrics.draft_forwards.add(1, {"reported_by": "service"})
            self.tel.metrics.queue_wait.record(step.queue_ns / 1e9, {"reported_by": "draft"})
        if self.ctx is None:
            return
        w = next((w for w in reversed(self.windows) if w.id == p.window_id), None)
        if w is not None:
            w.starts.append(step.started_unix_ns)
            w.durations.append(step.forward_ns)
            w.input_tokens += step.input_tokens
            w.batch_rows.append(step.batch_rows)
            w.queue_ns.append(step.queue_ns)

    def _close_all(self, keep: int | None) -> list:
        """Start spans for every window that drafted; ``keep`` None: the session ended."""
        out = []
        for w in self.windows:
            if not w.starts or self.ctx is None:
                continue
            n = len(w.starts)
            attrs = {"pearl.session_id": self.session, "pearl.window_id": w.id,
                     "pearl.position": w.start, "pearl.tokens_drafted": n,
                     "pearl.gamma": w.goal - w.start, "pearl.input_tokens": w.input_tokens,
                     "pearl.forward_starts_unix_ns": w.starts, "pearl.forward_ns": w.durations,
                     "pearl.batch_rows": w.batch_rows, "pearl.queue_ns": w.queue_ns}
            if keep is None:
                fate = "ended"
            elif w.start + n <= keep:
                fate = "accepted"
            elif w.start <= keep:
                fate = "cut"
                attrs["pearl.cut_at"] = keep - w.start
            else:
                fate = "stale"
            attrs["pearl.fate"] = fate
            span = self.tel.tracer.start_span("draft.window", context=self.ctx,
                                              start_time=w.starts[0], attributes=attrs)
            out.append((span, fate, max(s + d for s, d in zip(w.starts, w.durations))))
        self.windows = []
        return out

    def close(self) -> None:
        for s, _, end in self._close_all(None):
            s.end(end_time=end)
        if self.tel.metrics is not None:
            self.tel.metrics.active_sessions.add(-1)


class NoDraftTrace:
    """Telemetry off (or no session yet): the hooks do nothing, so no per-token work is done."""

    def request(self, req) -> None:
        pass

    def proposal(self, p) -> None:
        pass

    def close(self) -> None:
        pass


NO_DRAFT_TRACE = NoDraftTrace()


def draft_trace(tel: Telemetry, start) -> DraftTrace | NoDraftTrace:
    """The trace of the stream that ``start`` (a ``DraftStart``) opened."""
    return DraftTrace(tel, start) if tel.enabled else NO_DRAFT_TRACE
