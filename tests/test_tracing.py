"""Telemetry (docs/design.md section 9): one trace per request across the three services, the
overlap visible in the spans, a real OTLP peer, Prometheus counters, and `pearl trace`.

The three services run in this process (tests/cluster.py) on loopback gRPC, each with its own
TracerProvider and MeterProvider as `pearl serve` gives each process, so they keep their service
names; spans cross the real streams through DraftStart/VerifyStart.trace_context.
"""

import json
import time
import urllib.request
from concurrent import futures

import grpc
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from cluster import Cluster
from conftest import noisy_copy
from grpc_health.v1 import health_pb2, health_pb2_grpc
from coordinator.tracing import NO_REQUEST_TRACE
from coordinator.tracing import request_trace as open_request_trace
from draft_service.tracing import NO_DRAFT_TRACE, DraftTrace, draft_trace
from pearl.cli import main as pearl_main
from pearl.client import Client
from pearl.trace import figures, load_spans, pick_request
from protos.v1 import pearl_pb2 as pb
from specdec.answers import Proposal, StepTiming
from specdec.models import tiny_loaded
from specdec.stats import intersection
from specdec.telemetry import JsonLinesSpanExporter, Telemetry, inject_context, span_to_dict
from target_service.tracing import NO_TARGET_TRACE, target_trace

ROLES = ("draft", "target", "coordinator")
PROMPT = list(range(30, 60))


def pair():
    """Tiny models big enough that a forward pass is mostly compute, not Python (as in
    test_pearl.py): the draft is the target with noise and 2 of its 6 layers."""
    kw = dict(hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2, intermediate_size=1024)
    target = tiny_loaded(5, **kw)
    draft = noisy_copy(tiny_loaded(5, **kw), 3, 0.08)
    draft.model.model.layers = draft.model.model.layers[:2]
    draft.model.config.num_hidden_layers = 2
    return draft, target


class Traced:
    """A cluster whose services trace into memory and JSON-lines files and serve metrics."""

    def __init__(self, tmp):
        draft, target = pair()
        self.c = Cluster(draft, target)
        self.memory = {r: InMemorySpanExporter() for r in ROLES}
        # draft and target share one file, the coordinator writes another: `pearl trace` reads both
        self.files = [tmp / "services.jsonl", tmp / "coordinator.jsonl"]
        self.tel, self.metrics_url = {}, {}
        for role, svc in zip(ROLES, (self.c.draft, self.c.target, self.c.coordinator)):
            registry = CollectorRegistry()
            f = self.files[role == "coordinator"]
            tel = Telemetry(f"pearl-{role}", [self.memory[role], JsonLinesSpanExporter(f)],
                            [PrometheusMetricReader(registry=registry)], batch=False)
            port = tel.serve_metrics(registry, 0, "127.0.0.1")
            self.metrics_url[role] = f"http://127.0.0.1:{port}/metrics"
            svc.telemetry = self.tel[role] = tel

    def spans(self, role=None) -> list[dict]:
        roles = [role] if role else ROLES
        return [span_to_dict(s) for r in roles for s in self.memory[r].get_finished_spans()]

    def close(self):
        self.c.close()
        for tel in self.tel.values():
            tel.shutdown()


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    t = Traced(tmp_path_factory.mktemp("traces"))
    # A traced client: its span must become the parent of the pearl request's span.
    client_provider = TracerProvider(resource=Resource.create({"service.name": "test-client"}))
    client_memory = InMemorySpanExporter()
    client_provider.add_span_processor(SimpleSpanProcessor(client_memory))
    tracer = client_provider.get_tracer("test")
    t.results = {}
    try:
        with Client(t.c.address) as cl:
            t.results["warm-up"] = cl.complete(PROMPT, mode="pearl", max_new_tokens=8)
            t.results["sd"] = cl.complete(PROMPT, mode="sd", max_new_tokens=48, gamma=3)
            with tracer.start_as_current_span("client.generate") as client_span:
                t.results["pearl"] = cl.complete(PROMPT, mode="pearl", max_new_tokens=48)
            t.client_span_id = format(client_span.get_span_context().span_id, "016x")
        time.sleep(0.3)  # the services close their sessions (last draft.window spans)
        yield t
    finally:
        t.close()


def request_trace(t: Traced, mode: str) -> tuple[dict, list[dict]]:
    reqs = [s for s in t.spans("coordinator") if s["name"] == "pearl.generate"
            and s["attributes"]["pearl.mode"] == mode
            and s["attributes"]["pearl.new_tokens"] == 48]
    assert len(reqs) == 1
    req = reqs[0]
    return req, [s for s in t.spans() if s["trace_id"] == req["trace_id"]]


def forward_intervals(spans: list[dict]) -> tuple[list, list]:
    draft = [(st, st + d) for s in spans if s["name"] == "draft.window"
             for st, d in zip(s["attributes"]["pearl.forward_starts_unix_ns"],
                              s["attributes"]["pearl.forward_ns"])]
    target = [(s["start_unix_ns"], s["end_unix_ns"]) for s in spans
              if s["name"] == "target.verify" and s["attributes"]["pearl.input_tokens"]]
    return draft, target


@pytest.mark.parametrize("mode", ["pearl", "sd"])
def test_one_trace_per_request_with_the_right_parents(traced, mode):
    req, spans = request_trace(traced, mode)
    stats = traced.results[mode].stats
    session = req["attributes"]["pearl.session_id"]
    assert req["service"] == "pearl-coordinator"
    assert req["parent_span_id"] == (traced.client_span_id if mode == "pearl" else None)
    # every span of this session on the services, and nothing else, is in the request's trace
    for role, name in (("draft", "draft.window"), ("target", "target.verify")):
        mine = [s for s in traced.spans(role) if s["attributes"]["pearl.session_id"] == session]
        assert mine and all(s["name"] == name and s["service"] == f"pearl-{role}" for s in mine)
        assert {s["trace_id"] for s in mine} == {req["trace_id"]}
        assert {s["parent_span_id"] for s in mine} == {req["span_id"]}
    assert {s["name"] for s in spans} == {"pearl.generate", "draft.window", "target.verify"}
    assert sum(s["name"] == "pearl.generate" for s in spans) == 1
    # the spans are the forward passes the statistics counted
    verifies = [s for s in spans if s["name"] == "target.verify"]
    assert sum(1 for s in verifies if s["attributes"]["pearl.input_tokens"]) == \
        stats["target_forwards"]
    judged = [s for s in verifies if s["attributes"]["pearl.phase"] != "start"]
    assert sum(s["attributes"]["pearl.verified"] for s in judged) == stats["draft_tokens"]
    assert sum(s["attributes"]["pearl.accepted"] for s in judged) == stats["accepted_tokens"]
    assert {s["attributes"]["pearl.phase"] for s in judged} <= (
        {"pre", "post", "held"} if mode == "pearl" else {"sd"})
    windows = [s for s in spans if s["name"] == "draft.window"]
    assert sum(s["attributes"]["pearl.tokens_drafted"] for s in windows) >= \
        stats["draft_forwards"]
    assert req["attributes"]["pearl.stats.new_tokens"] == stats["new_tokens"] == 48
    for s in windows:  # a window span is exactly its forward passes
        a = s["attributes"]
        assert s["start_unix_ns"] == a["pearl.forward_starts_unix_ns"][0]
        assert s["end_unix_ns"] == max(st + d for st, d in zip(a["pearl.forward_starts_unix_ns"],
                                                                a["pearl.forward_ns"]))
        assert 1 <= a["pearl.tokens_drafted"] <= a["pearl.gamma"]
        # each forward pass's engine step size and queue wait (one per pass)
        assert len(a["pearl.batch_rows"]) == len(a["pearl.queue_ns"]) == len(a["pearl.forward_ns"])
        assert min(a["pearl.batch_rows"]) >= 1
    for s in verifies:  # the engine step the verdict's forward pass ran in
        a = s["attributes"]
        if a["pearl.input_tokens"]:
            assert a["pearl.batch_rows"] >= 1 and a["pearl.batch_tokens"] >= a["pearl.input_tokens"]
            assert a["pearl.queue_ns"] >= 0


def test_pearl_draft_and_verify_spans_overlap_and_sd_do_not(traced):
    req, spans = request_trace(traced, "pearl")
    wall = (req["end_unix_ns"] - req["start_unix_ns"]) / 1e9
    draft, target = forward_intervals(spans)
    assert intersection(draft, target) / 1e9 > 0.05 * wall, "pearl: draft and target overlap"
    windows = [(s["start_unix_ns"], s["end_unix_ns"]) for s in spans if s["name"] == "draft.window"]
    assert intersection(windows, target) > 0  # as a trace viewer shows them: bars side by side
    req, spans = request_trace(traced, "sd")
    draft, target = forward_intervals(spans)
    assert intersection(draft, target) == 0, "sd: draft and target take turns"
    windows = [(s["start_unix_ns"], s["end_unix_ns"]) for s in spans if s["name"] == "draft.window"]
    assert intersection(windows, target) == 0


def test_rejections_cut_windows_and_roll_back(traced):
    req, spans = request_trace(traced, "pearl")
    stats = traced.results["pearl"].stats
    windows = [s for s in spans if s["name"] == "draft.window"]
    fates = [s["attributes"]["pearl.fate"] for s in windows]
    assert set(fates) <= {"accepted", "cut", "stale", "ended"}
    rejections = [s for s in spans if s["name"] == "target.verify"
                  and s["attributes"]["pearl.rejected"]]
    assert stats["accepted_tokens"] < stats["draft_tokens"] and rejections
    cut = [s for s in windows if s["attributes"]["pearl.fate"] == "cut"]
    assert cut and all(0 <= s["attributes"]["pearl.cut_at"] < s["attributes"][
        "pearl.tokens_drafted"] for s in cut)
    rollbacks = [e for s in windows for e in s["events"] if e["name"] == "rollback"]
    # every rejection but one that ends the request rolls the draft back
    assert len(rejections) - 1 <= len(rollbacks) <= len(rejections)


def scrape(url: str) -> dict[str, float]:
    """Sample name (labels summed over) -> value."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("{" + s.labels["reported_by"] + "}" if "reported_by" in s.labels
                            else "")
            out[key] = out.get(key, 0) + s.value
    return out


def test_prometheus_counters_add_up_to_what_generate_reported(traced):
    runs = list(traced.results.values())
    total = lambda k: sum(r.stats[k] for r in runs)  # noqa: E731
    m = scrape(traced.metrics_url["coordinator"])
    assert m["pearl_requests_total{coordinator}"] == len(runs)
    for k in ("new_tokens", "draft_tokens", "accepted_tokens", "target_forwards",
              "draft_forwards"):
        assert m[f"pearl_{k}_total{{coordinator}}"] == total(k), k
    assert m["pearl_gamma_count{coordinator}"] == sum(len(r.stats["gamma_history"]) for r in runs)
    assert m["pearl_gamma_sum{coordinator}"] == sum(sum(r.stats["gamma_history"]) for r in runs)
    assert m["pearl_time_to_first_token_seconds_count{coordinator}"] == len(runs)
    assert m["pearl_time_to_first_token_seconds_sum{coordinator}"] == pytest.approx(
        total("time_to_first_token_s"))
    assert m["pearl_accepted_run_length_sum{coordinator}"] == total("accepted_tokens")
    assert m["pearl_active_sessions"] == 0
    t = scrape(traced.metrics_url["target"])
    assert t["pearl_target_forwards_total{service}"] == total("target_forwards")
    assert t["pearl_verify_latency_seconds_count"] == total("target_forwards") - len(runs)
    d = scrape(traced.metrics_url["draft"])
    assert d["pearl_draft_forwards_total{service}"] >= total("draft_forwards")
    # the engines: a queue wait per forward, a batch size, tokens and latency per step
    assert t["pearl_engine_queue_wait_seconds_count{target}"] == total("target_forwards")
    assert d["pearl_engine_queue_wait_seconds_count{draft}"] == \
        d["pearl_draft_forwards_total{service}"]
    for role_metrics in (t, d):
        assert role_metrics["pearl_active_sessions"] == 0
        steps = role_metrics["pearl_engine_batch_rows_count"]
        assert steps > 0 and role_metrics["pearl_engine_batch_tokens_count"] == steps
        assert role_metrics["pearl_engine_step_latency_seconds_count"] == steps


def test_pearl_trace_draws_the_request_and_matches_its_statistics(traced, tmp_path, capsys):
    for tel in traced.tel.values():
        tel.force_flush()
    files = [str(f) for f in traced.files]
    for mode in ("pearl", "sd"):
        req, _ = request_trace(traced, mode)
        out = tmp_path / f"{mode}.png"
        pearl_main(["trace", *files, "--trace-id", req["trace_id"], "--out", str(out), "--json"])
        got = json.loads(capsys.readouterr().out)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
        s = traced.results[mode].stats
        # The statistics time each pass by its arrival at the coordinator, the spans by the
        # service's own clock. Here all three services share one process (one GIL, one event
        # loop), so arrivals jitter by milliseconds against passes of a few ms: the two differ by
        # up to ~2.5% of the wall time (across real processes on the real pair: ~0.3%).
        tol = 0.05 * s["wall_s"] + 0.002
        assert got["mode"] == mode and got["trace_id"] == req["trace_id"]
        # the request span opens just before the statistics start and closes just after they
        # are written: it covers their wall time and exceeds it by set-up and write-up only
        assert s["wall_s"] <= got["wall_s"] <= s["wall_s"] * 1.01 + 0.02
        for k in ("both_busy_s", "target_idle_s", "draft_idle_s"):
            assert got[k] == pytest.approx(s[k], abs=tol), k
        assert got["overlap_ratio"] == pytest.approx(s["overlap_ratio"], abs=0.05)
        assert got["reported"]["both_busy_s"] == pytest.approx(s["both_busy_s"])
    # without --trace-id: the latest request (the pearl one); plain output names the figures
    pearl_main(["trace", *files, "--out", str(tmp_path / "latest.png")])
    text = capsys.readouterr().out
    assert "(pearl)" in text
    for k in ("both_busy_s", "target_idle_s", "draft_idle_s", "overlap_ratio"):
        assert k in text
    assert figures(*pick_request(load_spans(files)))["both_busy_s"] > 0


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """The receiving end of OTLP/gRPC, as an OpenTelemetry collector implements it."""

    def __init__(self):
        self.requests, self.metadata = [], []

    def Export(self, request, context):
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_reach_a_real_otlp_peer(traced, monkeypatch):
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-pearl-test=otlp")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    services = (traced.c.draft, traced.c.target, traced.c.coordinator)
    before = [s.telemetry for s in services]
    otlp = [Telemetry.for_service(role) for role in ROLES]  # what `pearl serve` does
    try:
        for svc, tel in zip(services, otlp):
            svc.telemetry = tel
        with Client(traced.c.address) as cl:
            r = cl.complete(PROMPT, mode="pearl", max_new_tokens=16)
        time.sleep(0.3)
        for tel in otlp:
            tel.shutdown()  # flushes the batch processor to the collector
    finally:
        for svc, tel in zip(services, before):
            svc.telemetry = tel
        server.stop(0)
    names: dict[str, set] = {}
    trace_ids = set()
    for req in collector.requests:
        for rs in req.resource_spans:
            attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    names.setdefault(attrs["service.name"], set()).add(sp.name)
                    trace_ids.add(sp.trace_id)
    assert names == {"pearl-coordinator": {"pearl.generate"}, "pearl-draft": {"draft.window"},
                     "pearl-target": {"target.verify"}}
    assert len(trace_ids) == 1 and r.stats["new_tokens"] == 16
    assert all(md.get("x-pearl-test") == "otlp" for md in collector.metadata)


def test_telemetry_is_off_by_default_and_health_is_not_traced(traced, monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    off = Telemetry.for_service("draft")
    assert off is Telemetry.off() and not off.enabled and not off.tracing
    assert isinstance(off.tracer, trace.NoOpTracer)
    start = pb.DraftStart(session_id="s", prompt_ids=[1, 2], window_id=1, draft_until=4)
    assert draft_trace(off, start) is NO_DRAFT_TRACE
    assert target_trace(off, pb.VerifyStart()) is NO_TARGET_TRACE
    assert open_request_trace(off, None, "pearl", None) is NO_REQUEST_TRACE
    assert inject_context() == {}  # no span: nothing crosses the streams
    from coordinator.server import CoordinatorServicer
    from draft_service.server import DraftServicer
    from target_service.server import TargetServicer
    assert all(cls.telemetry is off for cls in (DraftServicer, TargetServicer,
                                                CoordinatorServicer))
    counts = {r: len(traced.memory[r].get_finished_spans()) for r in ROLES}
    for address in (traced.c.draft_address, traced.c.target_address, traced.c.address):
        with grpc.insecure_channel(address) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
    assert counts == {r: len(traced.memory[r].get_finished_spans()) for r in ROLES}


def test_draft_window_fates_from_the_control_messages():
    memory = InMemorySpanExporter()
    tel = Telemetry("pearl-draft", [memory], batch=False)
    parent = TracerProvider().get_tracer("t").start_span("pearl.generate")
    token = otel_context.attach(trace.set_span_in_context(parent))
    try:
        carrier = inject_context()
    finally:
        otel_context.detach(token)
    d = DraftTrace(tel, pb.DraftStart(session_id="s", prompt_ids=list(range(10)), window_id=1,
                                      draft_until=13, trace_context=carrier))

    def prop(wid, pos, t):
        d.proposal(Proposal(wid, pos, 0, StepTiming(forward_ns=10, started_unix_ns=t,
                                                    input_tokens=1)))

    for i, pos in enumerate((10, 11, 12)):
        prop(1, pos, 1000 + 100 * i)
    d.request(pb.DraftRequest(extend=pb.DraftExtend(window_id=2, draft_until=16)))
    prop(2, 13, 1300)
    prop(2, 14, 1400)
    d.request(pb.DraftRequest(extend=pb.DraftExtend(window_id=3, draft_until=19)))
    # the target rejected position 14: keep 14, append the correction, new window 4 from 15
    d.request(pb.DraftRequest(rollback=pb.DraftRollback(keep=14, append_ids=[7], window_id=4,
                                                        draft_until=18)))
    prop(4, 15, 2000)
    d.request(pb.DraftRequest(rollback=pb.DraftRollback(keep=15, append_ids=[8], window_id=5,
                                                        draft_until=19)))
    prop(5, 16, 3000)
    d.close()
    got = {s.attributes["pearl.window_id"]: s for s in memory.get_finished_spans()}
    assert set(got) == {1, 2, 4, 5}  # window 3 drafted nothing: no span
    assert got[1].attributes["pearl.fate"] == "accepted"
    assert got[2].attributes["pearl.fate"] == "cut" and got[2].attributes["pearl.cut_at"] == 1
    assert got[4].attributes["pearl.fate"] == "cut" and got[4].attributes["pearl.cut_at"] == 0
    assert got[5].attributes["pearl.fate"] == "ended"
    assert (got[1].start_time, got[1].end_time) == (1000, 1210)
    assert got[2].attributes["pearl.gamma"] == 3 and got[2].attributes["pearl.position"] == 13
    assert [e.name for e in got[2].events] == ["rollback"]
    assert got[2].events[0].attributes["pearl.keep"] == 14
    pid = parent.get_span_context()
    assert all(s.parent.span_id == pid.span_id and s.context.trace_id == pid.trace_id
               for s in got.values())
    # a window drafted wholly past the rejection is stale
    d = DraftTrace(tel, pb.DraftStart(session_id="s", prompt_ids=[1] * 10, window_id=1,
                                      draft_until=12, trace_context=carrier))
    prop(1, 10, 1)
    prop(1, 11, 2)
    d.request(pb.DraftRequest(extend=pb.DraftExtend(window_id=2, draft_until=14)))
    prop(2, 12, 3)
    d.request(pb.DraftRequest(rollback=pb.DraftRollback(keep=10, append_ids=[3], window_id=3,
                                                        draft_until=13)))
    fates = {s.attributes["pearl.window_id"]: s.attributes["pearl.fate"]
             for s in memory.get_finished_spans()[-2:]}
    assert fates == {1: "cut", 2: "stale"}
