"""The target service's traces: a ``target.verify`` span per verdict, forward counts, latency.

A span is exactly the verdict's forward pass (zero length for a ``held`` verdict, which runs
none): position, tokens verified and accepted, the phase, the engine batch it ran in and its
queue wait. Spans join the request's trace through ``VerifyStart.trace_context``. Set-up,
exporters and instruments: specdec/telemetry.py; reading the spans: docs/tracing.md.
"""

import time

from specdec.telemetry import Telemetry, extract_context


class TargetTrace:
    """One target stream: a ``target.verify`` span per verdict, forward counts and latency."""

    def __init__(self, tel: Telemetry, start):
        self.tel = tel
        self.ctx = extract_context(start.trace_context) if tel.tracing else None
        self.session = start.session_id
        if tel.metrics is not None:
            tel.metrics.active_sessions.add(1)

    def verdict(self, v, window_id: int, phase: str) -> None:
        """A ``specdec.answers.Verdict`` for a start (phase "start") or a window."""
        m, step = self.tel.metrics, v.step
        if m is not None and step.input_tokens:
            m.target_forwards.add(1, {"reported_by": "service"})
            if phase != "start":
                m.verify_latency.record(step.forward_ns / 1e9, {"phase": phase})
            m.queue_wait.record(step.queue_ns / 1e9, {"reported_by": "target"})
        if self.ctx is None:
            return
        start = step.started_unix_ns if step.input_tokens else time.time_ns()
        rejected = v.accepted < v.verified
        span = self.tel.tracer.start_span("target.verify", context=self.ctx, start_time=start,
                                          attributes={
            "pearl.session_id": self.session, "pearl.window_id": window_id,
            "pearl.phase": phase, "pearl.position": v.position, "pearl.verified": v.verified,
            "pearl.accepted": v.accepted, "pearl.rejected": rejected,
            "pearl.committed": v.committed, "pearl.input_tokens": step.input_tokens,
            "pearl.forward_ns": step.forward_ns, "pearl.batch_rows": step.batch_rows,
            "pearl.batch_tokens": step.batch_tokens, "pearl.queue_ns": step.queue_ns})
        span.end(end_time=start + step.forward_ns)

    def close(self) -> None:
        if self.tel.metrics is not None:
            self.tel.metrics.active_sessions.add(-1)


class NoTargetTrace:
    """Telemetry off (or no session yet): the hooks do nothing."""

    def verdict(self, v, window_id: int, phase: str) -> None:
        pass

    def close(self) -> None:
        pass


NO_TARGET_TRACE = NoTargetTrace()


def target_trace(tel: Telemetry, start) -> TargetTrace | NoTargetTrace:
    """The trace of the stream that ``start`` (a ``VerifyStart``) opened."""
    return TargetTrace(tel, start) if tel.enabled else NO_TARGET_TRACE
