"""The coordinator's traces: a ``pearl.generate`` span per request, and the request metrics.

The span carries the mode, session, prompt and new tokens, and the final statistics as
``pearl.stats.<name>``; its parent is the client's span when the client sent a ``traceparent``
in the call's metadata. The schedule runs in a task with this span current, so the links put it
into ``DraftStart`` / ``VerifyStart.trace_context`` and the services' spans join the request's
trace. Set-up, exporters and instruments: specdec/telemetry.py; reading the spans:
docs/tracing.md.
"""

import asyncio
import json
import sys
import time

from opentelemetry.trace import SpanKind, Status, StatusCode

from coordinator.request import Plan
from specdec.stats import Recorder
from specdec.telemetry import Telemetry, extract_context, traced_task


class RequestTrace:
    """The coordinator's ``pearl.generate`` span and request metrics."""

    def __init__(self, tel: Telemetry, grpc_context, mode: str, plan: Plan):
        self.tel = tel
        self.mode = mode
        self.open = True
        parent = None
        if tel.tracing and grpc_context is not None:
            md = {m.key: m.value for m in (grpc_context.invocation_metadata() or ())
                  if isinstance(m.value, str)}
            parent = extract_context(md)
        self.span = tel.tracer.start_span("pearl.generate", context=parent, kind=SpanKind.SERVER,
                                          attributes={
            "pearl.mode": mode, "pearl.session_id": plan.session_id,
            "pearl.prompt_tokens": len(plan.prompt_ids),
            "pearl.max_new_tokens": plan.max_new_tokens,
            "pearl.gamma_fixed": plan.gamma or 0, "pearl.gamma_max": plan.gamma_max})
        remaining = grpc_context.time_remaining() if grpc_context is not None else None
        if remaining is not None:  # the client's deadline (gRPC timeout; HTTP: body.timeout)
            self.span.set_attribute("pearl.deadline_s", round(remaining, 3))
        if tel.metrics is not None:
            tel.metrics.active_sessions.add(1)

    def task(self, coro) -> asyncio.Task:
        """Run the schedule ``coro`` in a task with the request span current (the links inject it
        into the streams); also notes when the schedule ended (the last event it consumed), which
        `pearl trace` needs to match the statistics."""
        task = traced_task(self.span, coro)
        task.add_done_callback(self.schedule_done)
        return task

    def schedule_done(self, _task=None) -> None:
        if self.open and self.span.is_recording():
            self.span.set_attribute("pearl.schedule_end_unix_ns", time.time_ns())

    def _end(self) -> None:
        self.open = False
        self.span.end()
        if self.tel.metrics is not None:
            self.tel.metrics.active_sessions.add(-1)

    def done(self, stats: dict, rec: Recorder) -> None:
        """Right after ``Recorder.finish``: the final statistics on the span, the metrics."""
        if not self.open:
            return
        if self.span.is_recording():
            self.span.set_attribute("pearl.new_tokens", stats["new_tokens"])
            for k, v in stats.items():
                if isinstance(v, dict):
                    v = json.dumps({str(a): b for a, b in v.items()})
                self.span.set_attribute(f"pearl.stats.{k}", v)
        if self.tel.metrics is not None:
            self.tel.metrics.request(stats, rec.accepted_runs())
        self._end()

    def fail_if_raising(self) -> None:
        """In the servicer's ``finally``: end the span with an error status when an exception
        (abort, cancellation, a lost service) is leaving Generate; on success ``done`` ends it."""
        exc = sys.exc_info()[1]
        if exc is None or not self.open:
            return
        self.span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        if self.tel.metrics is not None:
            self.tel.metrics.requests.add(1, {"reported_by": "coordinator", "mode": self.mode,
                                              "finish_reason": "error"})
        self._end()


class NoRequestTrace:
    """Telemetry off: a plain task, and the other hooks do nothing."""

    def task(self, coro) -> asyncio.Task:
        return asyncio.create_task(coro)

    def done(self, stats: dict, rec: Recorder) -> None:
        pass

    def fail_if_raising(self) -> None:
        pass


NO_REQUEST_TRACE = NoRequestTrace()


def request_trace(tel: Telemetry, grpc_context, mode: str, plan: Plan
                  ) -> RequestTrace | NoRequestTrace:
    """The trace of one Generate call (``grpc_context``: its servicer context, for the client's
    trace context)."""
    return RequestTrace(tel, grpc_context, mode, plan) if tel.enabled else NO_REQUEST_TRACE
