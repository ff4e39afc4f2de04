"""The image and the cpu-dev overlay as containers (issue 27; k8s/README.md, "Run it locally"):
`scripts/image.sh` (make image) builds the image with podman, `scripts/deploy_local.py up`
(make deploy-local) plays the rendered Deployments with `podman kube play`, and requests go end to
end through the coordinator's published port. Float32 through the ConfigMap (--set DTYPE=float32),
so every mode must give the target's exact greedy tokens. Needs root (podman, as CI runs it)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2

from conftest import free_port, health, until_recovered
from pearl.client import Client, Delta, Result
from pearl.demo import humaneval_prompt

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import deploy_local  # noqa: E402

ROLES = ("draft", "target", "coordinator")
N = 32
SERVING = health_pb2.HealthCheckResponse.SERVING


def podman(*args: str, check: bool = True) -> str:
    r = subprocess.run(["podman", *args], text=True, capture_output=True)
    if check and r.returncode:
        raise AssertionError(f"podman {' '.join(args)}: {r.stderr}")
    return r.stdout


def ctr(role: str) -> str:
    return f"{role}-pod-0-{role}"


def made_by_podman() -> dict[str, set[str]]:
    return {
        "pods": set(podman("pod", "ps", "--format", "{{.Name}}").split()),
        "containers": set(podman("ps", "-a", "--format", "{{.Names}}").split()),
        "volumes": set(podman("volume", "ls", "--format", "{{.Name}}").split()),
        "networks": set(podman("network", "ls", "--format", "{{.Name}}").split()),
    }


@pytest.fixture(scope="module")
def deployed():
    if os.geteuid() != 0:
        pytest.fail("the deployment test needs root: podman-setup installs Debian packages and "
                    "plays pods as root (CI runs as root)")
    env = {**os.environ, "PY": sys.executable}
    t0 = time.monotonic()
    subprocess.run(["bash", str(ROOT / "scripts" / "image.sh")], check=True, env=env)
    built_s = time.monotonic() - t0
    deploy_local.down(None)  # a deployment left by an interrupted run
    before = made_by_podman()
    port, http_port = free_port(), free_port()
    t0 = time.monotonic()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "deploy_local.py"), "up", "--port",
                    str(port), "--http-port", str(http_port), "--set", "DTYPE=float32",
                    "--timeout", "900"], check=True)
    up_s = time.monotonic() - t0
    info = {"address": f"127.0.0.1:{port}", "http": f"http://127.0.0.1:{http_port}",
            "before": before, "t_up": t0}
    try:
        with Client(info["address"], timeout_s=300) as c:
            for part in c.generate(humaneval_prompt(2), mode="ar", max_new_tokens=1):
                first_s = time.monotonic() - t0
                break
        print(f"\nimage built in {built_s:.0f} s; deploy up in {up_s:.0f} s; "
              f"first token {first_s:.1f} s after `up` began")
        yield info
    finally:
        deploy_local.down(None)


@pytest.fixture(scope="module")
def reference(deployed):
    """ar through the deployment: the target alone, float32 greedy."""
    with Client(deployed["address"], timeout_s=600) as c:
        return c.complete(humaneval_prompt(2), mode="ar", max_new_tokens=3 * N).token_ids


@pytest.mark.parametrize("mode", ["sd", "pearl", "hidden-transfer"])
def test_every_mode_gives_the_targets_tokens(deployed, reference, mode):
    with Client(deployed["address"], timeout_s=600) as c:
        r = c.complete(humaneval_prompt(2), mode=mode, max_new_tokens=N)
    assert r.token_ids == reference[:N], f"{mode} through the containers diverged from ar"
    assert not r.stats["fell_back"], r.stats["fallback_reason"]
    if mode in ("sd", "pearl"):
        assert r.stats["acceptance_rate"] > 0.5, r.stats
    if mode == "pearl":  # drafting and verifying overlapped across the two containers
        assert r.stats["overlap_ratio"] > 0 and r.stats["both_busy_s"] > 0, r.stats


def test_openai_api_through_the_published_port(deployed):
    """curl -N, as a user types it, against the coordinator container's HTTP port."""
    model = "qwen2.5-coder-1.5b-instruct"
    out = subprocess.run(
        ["curl", "-sS", "-N", f"{deployed['http']}/v1/completions", "-H",
         "Content-Type: application/json", "-d",
         json.dumps({"model": model, "prompt": humaneval_prompt(2), "max_tokens": N,
                     "stream": True, "stream_options": {"include_usage": True}})],
        capture_output=True, text=True, timeout=600, check=True).stdout
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", out[-500:]
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    with Client(deployed["address"], timeout_s=600) as c:
        assert text == c.complete(humaneval_prompt(2), mode="pearl", max_new_tokens=N).text
    assert chunks[-1]["usage"]["completion_tokens"] == N
    assert chunks[-1]["metrics"]["mode"] == "pearl" and not chunks[-1]["metrics"]["fell_back"]


def expected_args(role: str) -> list[str]:
    """The args of `role` as a cluster would run them: rendered anew, $(KEY) replaced by the
    ConfigMap's value (with the test's DTYPE), independently of the deploy script's code."""
    objs = deploy_local.render("cpu-dev")
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("pearl-config"))
    data = {**cm["data"], "DTYPE": "float32"}
    dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == role)
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    for key, value in data.items():
        args = [a.replace(f"$({key})", value) for a in args]
    assert not any("$(" in a for a in args), args
    return args


@pytest.mark.parametrize("role", ROLES)
def test_containers_run_as_the_manifests_say(deployed, role):
    assert podman("exec", ctr(role), "id", "-u").strip() == "10001"
    r = subprocess.run(["podman", "exec", ctr(role), "touch", "/probe"], capture_output=True, text=True)
    assert r.returncode != 0 and "Read-only file system" in r.stderr, r
    status = podman("exec", ctr(role), "cat", "/proc/1/status")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["CapEff"].strip() == "0000000000000000", "capabilities: drop ALL"
    assert fields["NoNewPrivs"].strip() == "1", "allowPrivilegeEscalation: false"
    argv = podman("exec", ctr(role), "cat", "/proc/1/cmdline").split("\0")[:-1]
    assert Path(argv[1]).name == "pearl", argv  # the entrypoint: python running bin/pearl
    assert argv[2:] == expected_args(role)
    if role != "coordinator":  # the host's model cache, read-only
        r = subprocess.run(["podman", "exec", ctr(role), "touch", "/cache/pearl/probe"],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "Read-only file system" in r.stderr, r
        podman("exec", ctr(role), "touch", "/cache/huggingface-probe")  # the emptyDir: writable


def draft_address() -> str:
    return f"{deploy_local.pod_ip('draft-pod-0')}:50051"


def test_draft_killed_mid_request_falls_back_and_comes_back(deployed, reference):
    """kill -9 of the draft's process (a crash, not `podman stop`) while a pearl request streams:
    the request ends with the target's exact tokens (fell_back), podman's restart policy brings
    the draft back, and the next pearl request drafts again."""
    pid = int(podman("inspect", ctr("draft"), "--format", "{{.State.Pid}}"))
    restarts = int(podman("inspect", ctr("draft"), "--format", "{{.RestartCount}}"))
    got: list = []
    streaming = threading.Event()

    def request():
        with Client(deployed["address"], timeout_s=600) as c:
            for part in c.generate(humaneval_prompt(2), mode="pearl", max_new_tokens=3 * N):
                got.append(part)
                if isinstance(part, Delta) and sum(len(p.token_ids) for p in got
                                                   if isinstance(p, Delta)) >= 8:
                    streaming.set()

    t = threading.Thread(target=request)
    t.start()
    assert streaming.wait(300), "the pearl request never streamed 8 tokens"
    os.kill(pid, signal.SIGKILL)
    t.join(600)
    assert not t.is_alive()
    result = got[-1]
    assert isinstance(result, Result), got[-3:]
    assert result.token_ids == reference, "the request's tokens after the draft died"
    assert result.stats["fell_back"], result.stats

    deadline = time.monotonic() + 300
    while int(podman("inspect", ctr("draft"), "--format", "{{.RestartCount}}")) == restarts:
        assert time.monotonic() < deadline, "podman did not restart the draft"
        time.sleep(1)
    while health(draft_address()) != SERVING:
        assert time.monotonic() < deadline, "the restarted draft never said SERVING"
        time.sleep(1)

    def drafted() -> Result:
        with Client(deployed["address"], timeout_s=600) as c:
            r = c.complete(humaneval_prompt(2), mode="pearl", max_new_tokens=N)
        if r.stats["fell_back"]:  # the coordinator has not seen the draft back yet
            raise _Unavailable()
        return r

    r = until_recovered(drafted, within_s=120, pause_s=2)
    assert r.token_ids == reference[:N]
    assert r.stats["acceptance_rate"] > 0.5, r.stats


class _Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE


def test_undeploy_leaves_nothing(deployed):
    made = made_by_podman()
    assert {"draft-pod-0", "target-pod-0", "coordinator-pod-0"} <= made["pods"]
    assert deploy_local.NETWORK in made["networks"]
    subprocess.run([sys.executable, str(ROOT / "scripts" / "deploy_local.py"), "down"], check=True)
    assert made_by_podman() == deployed["before"], "podman holds something the deployment made"
    assert not deploy_local.STATE.exists()
