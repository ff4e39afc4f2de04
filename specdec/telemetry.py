"""OpenTelemetry for the services (docs/design.md section 9): tracer and meter set-up, exporters,
the metrics instruments of section 6, and trace context carried across the long-lived streams.

One ``Telemetry`` per service object, each with its own TracerProvider and MeterProvider (never
the global ones), so that three services in one process keep their own service names. Nothing is
configured by default: ``Telemetry.off()`` has a no-op tracer and no meter, and the servicers'
hooks (``draft_session``, ``target_session``, ``request``) return None then, so no per-token work
is done at all.

Spans (names and attributes are fixed; docs/tracing.md explains how to read them):

- ``pearl.generate`` (coordinator): one per request; mode, session, prompt and new tokens, and the
  final statistics as ``pearl.stats.<name>``. Its parent is the client's span when the client
  sent a ``traceparent`` in the call's metadata.
- ``draft.window`` (draft): one per draft window that drafted at least one token, from the start
  of its first forward pass to the end of its last; the window's fate (``accepted``, ``cut`` at
  ``pearl.cut_at``, ``stale``, or ``ended`` when the session closed before a rollback judged it),
  the exact forward passes as two integer lists, and a ``rollback`` event.
- ``target.verify`` (target): one per verdict, exactly the forward pass (zero length for a
  ``held`` verdict, which runs none); position, tokens verified and accepted, phase.

The services parent their spans on the W3C trace context that the coordinator puts in
``DraftStart.trace_context`` / ``VerifyStart.trace_context``.
"""

import asyncio
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (BatchSpanProcessor, SimpleSpanProcessor, SpanExporter,
                                            SpanExportResult)
from opentelemetry.trace import SpanKind, Status, StatusCode

SERVICE_NAMES = {"draft": "pearl-draft", "target": "pearl-target",
                 "coordinator": "pearl-coordinator"}
SCOPE = "pearl"


# -- trace context across the streams ----------------------------------------------------------

def inject_context() -> dict[str, str]:
    """The current span's W3C trace context (traceparent, tracestate) as a string map; empty
    when no span is recording (tracing off)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_context(carrier) -> otel_context.Context:
    return propagate.extract(dict(carrier))


def traced_task(request: "RequestTrace | None", coro) -> asyncio.Task:
    """``asyncio.create_task(coro)`` with the request span current in the task, so that the links
    it writes to carry it to the services (``inject_context``); also notes when the schedule
    ended (the last event it consumed), which `pearl trace` needs to match the statistics."""
    if request is None:
        return asyncio.create_task(coro)
    token = otel_context.attach(trace.set_span_in_context(request.span))
    try:
        task = asyncio.create_task(coro)
    finally:
        otel_context.detach(token)
    task.add_done_callback(request.schedule_done)
    return task


# -- exporters ---------------------------------------------------------------------------------

def span_to_dict(span: ReadableSpan) -> dict:
    """One finished span as a JSON-lines record (the format `pearl trace` reads)."""
    ctx, parent = span.context, span.parent
    return {
        "name": span.name,
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
        "service": span.resource.attributes.get("service.name"),
        "start_unix_ns": span.start_time,
        "end_unix_ns": span.end_time,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "time_unix_ns": e.timestamp,
                    "attributes": dict(e.attributes or {})} for e in span.events],
        "status": span.status.status_code.name,
    }


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per span to a file. Each batch is one O_APPEND write, so several
    processes can share one file."""

    schedule_delay_millis = 200  # spans reach the file soon after a request (`pearl trace`)

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.lock = threading.Lock()

    def export(self, spans) -> SpanExportResult:
        data = "".join(json.dumps(span_to_dict(s)) + "\n" for s in spans).encode()
        with self.lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() == "true"


def otlp_configured() -> bool:
    """OTLP export is on when an endpoint is set by the standard variables (and neither
    OTEL_SDK_DISABLED nor OTEL_TRACES_EXPORTER=none turns it off)."""
    if _env_true("OTEL_SDK_DISABLED"):
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


# -- metrics -----------------------------------------------------------------------------------

SMALL_COUNTS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 64]
SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
TOKEN_COUNTS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]


class Metrics:
    """The section-6 instruments with a ``pearl_`` prefix. The coordinator records the
    request-level ones from the final statistics (attribute ``reported_by=coordinator``); the
    draft and target services count their own forward passes (``reported_by=service``)."""

    def __init__(self, provider):
        self.provider = provider
        m = provider.get_meter(SCOPE)
        c = m.create_counter
        self.requests = c("pearl_requests", description="Generate requests finished")
        self.new_tokens = c("pearl_new_tokens", description="Tokens committed and returned")
        self.draft_tokens = c("pearl_draft_tokens",
                              description="Draft tokens sent for verification")
        self.accepted_tokens = c("pearl_accepted_tokens", description="Draft tokens accepted")
        self.target_forwards = c("pearl_target_forwards", description="Target forward passes")
        self.draft_forwards = c("pearl_draft_forwards", description="Draft forward passes")
        h = m.create_histogram
        self.accepted_run_length = h(
            "pearl_accepted_run_length", explicit_bucket_boundaries_advisory=SMALL_COUNTS,
            description="Runs of consecutively accepted draft tokens between two rejections")
        self.gamma = h("pearl_gamma", explicit_bucket_boundaries_advisory=SMALL_COUNTS,
                       description="Window length chosen at each window start")
        self.verify_latency = h("pearl_verify_latency", unit="s",
                                explicit_bucket_boundaries_advisory=SECONDS,
                                description="Target forward pass of one verification round")
        self.time_to_first_token = h("pearl_time_to_first_token", unit="s",
                                     explicit_bucket_boundaries_advisory=SECONDS,
                                     description="Request start to the first committed token")
        # the engine (specdec/engine.py): one record per step, and the wait of each forward
        self.batch_rows = h("pearl_engine_batch_rows",
                            explicit_bucket_boundaries_advisory=SMALL_COUNTS,
                            description="Sessions whose work one engine step ran together")
        self.batch_tokens = h("pearl_engine_batch_tokens",
                              explicit_bucket_boundaries_advisory=TOKEN_COUNTS,
                              description="Tokens fed in one engine step, all sessions together")
        self.step_latency = h("pearl_engine_step_latency", unit="s",
                              explicit_bucket_boundaries_advisory=SECONDS,
                              description="Duration of one engine step (one batched forward)")
        self.queue_wait = h("pearl_engine_queue_wait", unit="s",
                            explicit_bucket_boundaries_advisory=SECONDS,
                            description="Time a session's forward waited for its engine step")
        self.active_sessions = m.create_up_down_counter(
            "pearl_active_sessions", description="Sessions (coordinator: requests) open now")

    def request(self, stats: dict, runs: list[int]) -> None:
        by = {"reported_by": "coordinator"}
        attrs = {**by, "mode": stats["mode"], "finish_reason": stats["finish_reason"]}
        self.requests.add(1, attrs)
        for name in ("new_tokens", "draft_tokens", "accepted_tokens", "target_forwards",
                     "draft_forwards"):
            getattr(self, name).add(int(stats[name]), {**by, "mode": stats["mode"]})
        for run in runs:
            self.accepted_run_length.record(run, by)
        for g in stats["gamma_history"]:
            self.gamma.record(g, by)
        self.time_to_first_token.record(stats["time_to_first_token_s"], by)


# -- one service's telemetry -------------------------------------------------------------------

class Telemetry:
    """A service's tracer and meter. ``Telemetry.off()`` does nothing and costs nothing."""

    def __init__(self, service_name: str, span_exporters=(), metric_readers=(),
                 batch: bool = True):
        self.service_name = service_name
        self.tracing = bool(span_exporters)
        self.tracer_provider = None
        self.tracer: trace.Tracer = trace.NoOpTracer()
        self._http = None
        resource = None
        if span_exporters or metric_readers:
            resource = Resource.create({"service.name": service_name})
        if self.tracing:
            self.tracer_provider = TracerProvider(resource=resource)
            for exp in span_exporters:
                proc = (BatchSpanProcessor(exp, schedule_delay_millis=getattr(
                    exp, "schedule_delay_millis", None)) if batch else SimpleSpanProcessor(exp))
                self.tracer_provider.add_span_processor(proc)
            self.tracer = self.tracer_provider.get_tracer(SCOPE)
        self.metrics: Metrics | None = None
        if metric_readers:
            from opentelemetry.sdk.metrics import MeterProvider

            self.metrics = Metrics(MeterProvider(metric_readers=list(metric_readers),
                                                 resource=resource))

    _OFF: "Telemetry | None" = None

    @classmethod
    def off(cls) -> "Telemetry":
        if cls._OFF is None:
            cls._OFF = cls("off")
        return cls._OFF

    @classmethod
    def for_service(cls, role: str, trace_file: str | None = None,
                    metrics_port: int | None = None, metrics_host: str = "0.0.0.0",
                    service_name: str | None = None) -> "Telemetry":
        """What `pearl serve` uses: OTLP/gRPC when OTEL_EXPORTER_OTLP_ENDPOINT is set (the
        exporter reads the other OTEL_EXPORTER_OTLP_* variables itself: headers, insecure,
        certificates, timeout), a JSON-lines file by ``trace_file``, Prometheus on
        ``metrics_port``; OTEL_SERVICE_NAME overrides the default name pearl-<role>."""
        name = service_name or os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAMES[role]
        exporters: list[SpanExporter] = []
        if otlp_configured():
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        if trace_file:
            exporters.append(JsonLinesSpanExporter(trace_file))
        readers, registry = [], None
        if metrics_port is not None:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry()
            readers.append(PrometheusMetricReader(registry=registry))
        if not exporters and not readers:
            return cls.off()
        tel = cls(name, exporters, readers)
        if registry is not None:
            host = metrics_host.strip("[]")
            tel.serve_metrics(registry, int(metrics_port), "0.0.0.0" if host in ("", "::") else host)
        return tel

    def serve_metrics(self, registry, port: int, host: str = "0.0.0.0") -> int:
        """Serve ``registry`` for Prometheus on http://host:port/metrics; returns the port."""
        from prometheus_client import start_http_server

        server, thread = start_http_server(port, host, registry=registry)
        self._http = (server, thread)
        self.metrics_port = server.server_port
        return self.metrics_port

    @property
    def enabled(self) -> bool:
        return self.tracing or self.metrics is not None

    def engine_step(self, rows: int, tokens: int, step_ns: int) -> None:
        """One step of this service's engine (installed as ``Engine.on_step``)."""
        if self.metrics is not None:
            self.metrics.batch_rows.record(rows)
            self.metrics.batch_tokens.record(tokens)
            self.metrics.step_latency.record(step_ns / 1e9)

    def force_flush(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush()

    def shutdown(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.metrics is not None:
            self.metrics.provider.shutdown()
        if self._http is not None:
            self._http[0].shutdown()
            self._http[0].server_close()
            self._http = None

    # -- hooks the servicers call; each returns None when telemetry is off ----------------------

    def request(self, grpc_context, mode: str, plan) -> "RequestTrace | None":
        return RequestTrace(self, grpc_context, mode, plan) if self.enabled else None

    def draft_session(self, start) -> "DraftTrace | None":
        return DraftTrace(self, start) if self.enabled else None

    def target_session(self, start) -> "TargetTrace | None":
        return TargetTrace(self, start) if self.enabled else None


# -- coordinator -------------------------------------------------------------------------------

class RequestTrace:
    """The coordinator's ``pearl.generate`` span and request metrics."""

    def __init__(self, tel: Telemetry, grpc_context, mode: str, plan):
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
        if tel.metrics is not None:
            tel.metrics.active_sessions.add(1)

    def schedule_done(self, _task=None) -> None:
        if self.open and self.span.is_recording():
            self.span.set_attribute("pearl.schedule_end_unix_ns", time.time_ns())

    def _end(self) -> None:
        self.open = False
        self.span.end()
        if self.tel.metrics is not None:
            self.tel.metrics.active_sessions.add(-1)

    def done(self, stats: dict, rec) -> None:
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
            runs = rec.runs + [rec.run] if rec.draft_tokens else []
            self.tel.metrics.request(stats, runs)
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


# -- draft -------------------------------------------------------------------------------------

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
        """A drafted token (a ``drafter.Proposal``), after its forward pass."""
        if self.tel.metrics is not None:
            self.tel.metrics.draft_forwards.add(1, {"reported_by": "service"})
            self.tel.metrics.queue_wait.record(p.queue_ns / 1e9, {"reported_by": "draft"})
        if self.ctx is None:
            return
        w = next((w for w in reversed(self.windows) if w.id == p.window_id), None)
        if w is not None:
            w.starts.append(p.started_unix_ns)
            w.durations.append(p.forward_ns)
            w.input_tokens += p.input_tokens
            w.batch_rows.append(p.batch_rows)
            w.queue_ns.append(p.queue_ns)

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


# -- target ------------------------------------------------------------------------------------

class TargetTrace:
    """One target stream: a ``target.verify`` span per verdict, forward counts and latency."""

    def __init__(self, tel: Telemetry, start):
        self.tel = tel
        self.ctx = extract_context(start.trace_context) if tel.tracing else None
        self.session = start.session_id
        if tel.metrics is not None:
            tel.metrics.active_sessions.add(1)

    def verdict(self, v, window_id: int, phase: str) -> None:
        """A ``verifier.Verdict`` for a start (phase "start") or a window."""
        m = self.tel.metrics
        if m is not None and v.input_tokens:
            m.target_forwards.add(1, {"reported_by": "service"})
            if phase != "start":
                m.verify_latency.record(v.forward_ns / 1e9, {"phase": phase})
            m.queue_wait.record(v.queue_ns / 1e9, {"reported_by": "target"})
        if self.ctx is None:
            return
        start = v.started_unix_ns if v.input_tokens else time.time_ns()
        rejected = v.accepted < v.verified
        span = self.tel.tracer.start_span("target.verify", context=self.ctx, start_time=start,
                                          attributes={
            "pearl.session_id": self.session, "pearl.window_id": window_id,
            "pearl.phase": phase, "pearl.position": v.position, "pearl.verified": v.verified,
            "pearl.accepted": v.accepted, "pearl.rejected": rejected,
            "pearl.committed": v.committed, "pearl.input_tokens": v.input_tokens,
            "pearl.forward_ns": v.forward_ns, "pearl.batch_rows": v.batch_rows,
            "pearl.batch_tokens": v.batch_tokens, "pearl.queue_ns": v.queue_ns})
        span.end(end_time=start + v.forward_ns)

    def close(self) -> None:
        if self.tel.metrics is not None:
            self.tel.metrics.active_sessions.add(-1)

