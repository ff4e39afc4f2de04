"""Faults with real service processes (`pearl serve`, float32, one thread each): the target is the
small real model smollm2-135m-instruct, the draft a noisy copy of it saved as a model folder (it
agrees on about three tokens in four, so rejections and rollbacks happen under the faults too): the draft or the target killed with SIGKILL in
the middle of a request and restarted on its port; SIGTERM on the coordinator drains in-flight
requests and exits. In-process versions of the same behaviours: tests/test_reliability.py."""

import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from conftest import health, until_recovered
from pearl.client import Client, Delta, Result
from pearl.procs import running
from specdec import model_store
from specdec.models import load_model, noisy_copy

MODEL = "smollm2-135m-instruct"
DRAFT_NOISE = 0.08  # noisy_copy scale: greedy agreement ~0.75 with the target on PROMPT
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
N = 48
FLAGS = ["--dtype", "float32", "--threads", "1"]

pytestmark = pytest.mark.slow  # three processes start and restart: ~50 s on two cores


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, list[str]]:
    """`--model` of each role: smollm2 for the target, a noisy copy of it for the draft."""
    model_store.resolve(MODEL)  # fetched and converted once (~30 s), not by two services at once
    target = load_model(MODEL, dtype="float32")
    draft = noisy_copy(target, 3, DRAFT_NOISE)
    folder = tmp_path_factory.mktemp("noisy-smollm2")
    draft.model.save_pretrained(folder)
    draft.tokenizer.save_pretrained(folder)
    return {"draft": ["--model", str(folder), *FLAGS], "target": ["--model", MODEL, *FLAGS]}


@pytest.fixture(scope="module")
def svcs(tmp_path_factory, models):
    with running(tmp_path_factory.mktemp("faults")) as s:
        s.models = models
        s.start("draft", models["draft"])
        s.start("target", models["target"])
        draft, target = s.wait("draft", 300), s.wait("target", 300)
        s.start("coordinator", ["--draft", draft, "--target", target, "--draft-timeout", "5",
                                "--grace", "30"])
        s.wait("coordinator", 300)
        yield s


@pytest.fixture(scope="module")
def reference(svcs):
    """The undisturbed greedy output: the target alone (ar) and pearl agree on it."""
    with Client(svcs.all["coordinator"].address, timeout_s=120) as c:
        ar = c.complete(PROMPT, mode="ar", max_new_tokens=N, ignore_eos=True)
        pearl = c.complete(PROMPT, mode="pearl", max_new_tokens=N, ignore_eos=True)
    assert ar.token_ids == pearl.token_ids and not pearl.stats["fell_back"]
    assert 0 < pearl.stats["acceptance_rate"] < 1, "the draft must disagree sometimes"
    return ar.token_ids


def restart(svcs, role: str) -> None:
    old = svcs.all[role]
    port = old.port
    svcs.start(role, [*svcs.models[role], "--port", str(port)])  # the last --port wins
    svcs.wait(role, 300)


def test_draft_killed_mid_request_then_restarted(svcs, reference):
    coord = svcs.all["coordinator"].address
    with Client(coord, timeout_s=120) as c:
        parts = c.generate(PROMPT, mode="pearl", max_new_tokens=N, ignore_eos=True)
        first = next(parts)
        assert isinstance(first, Delta)
        svcs.all["draft"].proc.send_signal(signal.SIGKILL)
        rest = list(parts)
        svcs.all["draft"].proc.wait()
        result = rest[-1]
        assert isinstance(result, Result)
        assert result.token_ids == reference
        assert result.stats["fell_back"] and result.stats["fallback_reason"]

        for mode in ("sd", "pearl"):  # the draft is down: the target alone, without waiting
            t0 = time.monotonic()
            r = c.complete(PROMPT, mode=mode, max_new_tokens=N, ignore_eos=True)
            assert r.token_ids == reference and r.stats["fell_back"]
            assert time.monotonic() - t0 < 20

        restart(svcs, "draft")
        deadline = time.monotonic() + 30
        while True:
            r = c.complete(PROMPT, mode="pearl", max_new_tokens=N, ignore_eos=True)
            assert r.token_ids == reference
            if not r.stats["fell_back"]:
                break
            assert time.monotonic() < deadline, "the coordinator did not use the draft again"
            time.sleep(0.5)
        assert 0 < r.stats["accepted_tokens"] < r.stats["draft_tokens"]


def test_target_killed_mid_request_then_restarted(svcs, reference):
    coord = svcs.all["coordinator"].address
    got = []
    with Client(coord, timeout_s=120) as c:
        with pytest.raises(grpc.RpcError) as e:
            for part in c.generate(PROMPT, mode="pearl", max_new_tokens=N, ignore_eos=True):
                got.append(part)
                if len(got) == 1:
                    svcs.all["target"].proc.send_signal(signal.SIGKILL)
        svcs.all["target"].proc.wait()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "target service" in e.value.details()
        assert not any(isinstance(p, Result) for p in got)

        restart(svcs, "target")
        r = until_recovered(
            lambda: c.complete(PROMPT, mode="pearl", max_new_tokens=N, ignore_eos=True), 30, 0.5)
        assert r.token_ids == reference


def test_sigterm_drains_in_flight_requests_then_exits(svcs, reference):
    """Runs last in this module: it ends the coordinator."""
    coord = svcs.all["coordinator"]
    with Client(coord.address, timeout_s=120) as c:
        parts = c.generate(PROMPT, mode="ar", max_new_tokens=N, ignore_eos=True)
        got = [next(parts)]
        coord.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while health(coord.address) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health never said NOT_SERVING"
            time.sleep(0.02)
        got += list(parts)
    assert isinstance(got[-1], Result) and got[-1].token_ids == reference
    assert coord.proc.wait(timeout=30) == 0
