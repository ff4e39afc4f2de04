"""Promises about `pearl serve` processes, with tiny models saved as model folders (seconds to
start): --trace-file and --metrics-port, server reflection on draft and target, SIGTERM on the
draft and on the target drains the request in flight and exits 0, and a request that outlives
--grace is cut when the grace period ends while the process still exits. The coordinator's own
SIGTERM drain and the kill/restart faults are in tests/test_faults_processes.py."""

import json
import signal
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import free_port, greedy_reference, health, until_recovered
from pearl.client import Client, Result
from pearl.procs import running

pytestmark = pytest.mark.slow  # three processes started twice: ~30 s on two loaded cores

PROMPT = list(range(40, 50))
LONG = 900  # new tokens: seconds of work for a tiny model, so SIGTERM lands mid-request


def save(loaded, folder) -> str:
    loaded.tokenizer.pad_token = loaded.tokenizer.unk_token  # keep the pad id inside the vocab
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_draft, tiny_target):
    import copy

    root = tmp_path_factory.mktemp("models")
    return (save(copy.deepcopy(tiny_draft), root / "draft"),
            save(copy.deepcopy(tiny_target), root / "target"))


def start_all(svcs, folders, tmp, extra: dict[str, list[str]] | None = None) -> dict:
    extra = extra or {}
    common = ["--dtype", "float32", "--threads", "1"]
    svcs.start("draft", ["--model", folders[0], *common, *extra.get("draft", [])])
    svcs.start("target", ["--model", folders[1], *common, *extra.get("target", [])])
    draft, target = svcs.wait("draft", 300), svcs.wait("target", 300)
    svcs.start("coordinator", ["--draft", draft, "--target", target,
                               *extra.get("coordinator", [])])
    return {"draft": draft, "target": target, "coordinator": svcs.wait("coordinator", 300)}


def test_trace_file_metrics_port_and_reflection(folders, tiny_target, tmp_path):
    ports = {r: free_port() for r in ("draft", "target", "coordinator")}
    files = {r: tmp_path / f"{r}.jsonl" for r in ports}
    extra = {r: ["--trace-file", str(files[r]), "--metrics-port", str(ports[r])] for r in ports}
    with running(tmp_path) as svcs:
        addr = start_all(svcs, folders, tmp_path, extra)
        with Client(addr["coordinator"], timeout_s=60) as c:
            r = c.complete(PROMPT, mode="pearl", max_new_tokens=24, ignore_eos=True)
        assert r.token_ids == greedy_reference(tiny_target, PROMPT, 24)
        assert not r.stats["fell_back"] and r.stats["draft_tokens"] > 0
        metrics = {role: urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics",
                                                timeout=10).read().decode()
                   for role, p in ports.items()}
        for role, service in (("draft", "pearl.v1.DraftService"),
                              ("target", "pearl.v1.TargetService")):
            with grpc.insecure_channel(addr[role]) as ch:
                answers = list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                    timeout=10))
            names = {s.name for s in answers[0].list_services_response.service}
            assert {service, "grpc.health.v1.Health"} <= names, (role, names)
        time.sleep(0.5)
    # every process traced its part of the one request into its own file, under one trace id
    spans = {role: [json.loads(line) for line in f.read_text().splitlines()]
             for role, f in files.items()}
    req = next(s for s in spans["coordinator"] if s["name"] == "pearl.generate")
    trace_id = req["trace_id"]
    assert any(s["name"] == "draft.window" and s["trace_id"] == trace_id for s in spans["draft"])
    assert any(s["name"] == "target.verify" and s["trace_id"] == trace_id
               for s in spans["target"])
    # and counted it on its metrics port
    assert 'pearl_requests_total{' in metrics["coordinator"]
    assert "pearl_new_tokens_total" in metrics["coordinator"]
    assert "pearl_draft_forwards_total" in metrics["draft"]
    assert "pearl_target_forwards_total" in metrics["target"]


def test_sigterm_drains_draft_and_target_and_grace_ends_a_long_request(folders, tiny_target,
                                                                       tmp_path):
    with running(tmp_path) as svcs:
        addr = start_all(svcs, folders, tmp_path, {"draft": ["--grace", "60"],
                                                   "target": ["--grace", "60"]})
        ref = greedy_reference(tiny_target, PROMPT, LONG)
        with Client(addr["coordinator"], timeout_s=300) as c:
            for role, mode in (("draft", "pearl"), ("target", "ar")):
                proc = svcs.all[role].proc
                parts = c.generate(PROMPT, mode=mode, max_new_tokens=LONG, ignore_eos=True)
                next(parts)
                proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 10
                while health(addr[role]) != health_pb2.HealthCheckResponse.NOT_SERVING:
                    assert time.monotonic() < deadline, f"{role}: never NOT_SERVING"
                    time.sleep(0.02)
                assert proc.poll() is None, f"{role} exited before its request ended"
                result = list(parts)[-1]
                assert isinstance(result, Result) and result.token_ids == ref, role
                assert not result.stats["fell_back"], f"{role}: {result.stats['fallback_reason']}"
                assert proc.wait(timeout=30) == 0, f"{role} did not exit cleanly after draining"

        # a target whose grace period (1 s) is shorter than the request in flight
        port = int(addr["target"].rsplit(":", 1)[1])
        svcs.start("target", ["--model", folders[1], "--dtype", "float32", "--threads", "1",
                              "--port", str(port), "--grace", "1"])
        svcs.wait("target", 300)
        with Client(addr["coordinator"], timeout_s=300) as c:
            # the coordinator sees the new process once its health watch reconnects (seconds;
            # more on a loaded machine): recovery time itself is test_replicas' subject
            until_recovered(lambda: c.complete(PROMPT, mode="ar", max_new_tokens=4), 90, 0.5)
            parts = c.generate(PROMPT, mode="ar", max_new_tokens=LONG, ignore_eos=True)
            next(parts)
            proc = svcs.all["target"].proc
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as e:
                list(parts)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert proc.wait(timeout=30) == 0
            took = time.monotonic() - t0
        assert 0.8 < took < 10, f"the target took {took:.1f} s to stop with --grace 1"
