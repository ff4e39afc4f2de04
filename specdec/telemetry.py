"""OpenTelemetry for the services (docs/design.md section 9): tracer and meter set-up, exporters,
the metrics instruments of section 6, and trace context carried across the long-lived streams.

One ``Telemetry`` per service object, each with its own TracerProvider and MeterProvider (never
the global ones), so that three services in one process keep their own service names. Nothing is
configured by default: ``Telemetry.off()`` has a no-op tracer and no meter, and the services'
traces are no-op objects then, so no per-token work is done at all.

Each service's spans live with that service (names and attributes are fixed; docs/tracing.md
explains how to read them):

- ``pearl.generate`` (coordinator/tracing.py): one per request, with its final statistics.
- ``draft.window`` (draft_service/tracing.py): one per draft window that drafted, and its fate.
- ``target.verify`` (target_service/tracing.py): one per verdict, exactly its forward pass.

The services parent their spans on the W3C trace context that the coordinator puts in
``DraftStart.trace_context`` / ``VerifyStart.trace_context``.
"""

import asyncio
import json
import os
import threading

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (BatchSpanProcessor, SimpleSpanProcessor, SpanExporter,
                                            SpanExportResult)

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


def traced_task(span: trace.Span, coro) -> asyncio.Task:
    """``asyncio.create_task(coro)`` with ``span`` current in the task, so that what the task
    sends carries it (``inject_context``)."""
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        return asyncio.create_task(coro)
    finally:
        otel_context.detach(token)


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
WAIT_SECONDS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]
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
                       description="gamma chosen at each window (sd) or verification (pearl)")
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
        self.batch_wait = h("pearl_engine_batch_wait", unit="s",
                            explicit_bucket_boundaries_advisory=WAIT_SECONDS,
                            description="Time an engine step waited for the sessions of the last "
                                        "step to come back (--max-batch-wait-ms)")
        self.prefix_tokens = c("pearl_prefix_cache_tokens",
                               description="Prompt tokens looked up in the service's prefix "
                                           "cache, by result (hit: K/V reused; miss: prefilled)")
        self.http_requests = c("pearl_http_requests",
                               description="HTTP requests answered by the OpenAI-compatible "
                                           "front, by route and status")
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

    def engine_step(self, sessions: int, tokens: int, step_ns: int) -> None:
        """One step of this service's engine (installed as ``Engine.on_step``)."""
        if self.metrics is not None:
            self.metrics.batch_rows.record(sessions)
            self.metrics.batch_tokens.record(tokens)
            self.metrics.step_latency.record(step_ns / 1e9)

    def engine_wait(self, wait_ns: int) -> None:
        """A coalescing wait before a step of this service's engine (``Engine.on_wait``)."""
        if self.metrics is not None:
            self.metrics.batch_wait.record(wait_ns / 1e9)

    def prefix_lookup(self, hit: int, looked: int) -> None:
        """A prefill's lookup in this service's prefix cache (``Engine.on_prefix``)."""
        if self.metrics is not None:
            self.metrics.prefix_tokens.add(hit, {"result": "hit"})
            self.metrics.prefix_tokens.add(looked - hit, {"result": "miss"})

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
