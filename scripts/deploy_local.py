"""`make deploy-local` / `make undeploy-local`: the cpu-dev overlay, as kustomize renders it, run
as containers with `podman kube play` on one machine (k8s/README.md, "Run it locally").

The Deployments go to podman unchanged where podman implements Kubernetes: image, args, env and
envFrom the ConfigMap, ports, resources (cgroup limits), volumes, securityContext (uid 10001,
read-only root filesystem, no capabilities, no privilege escalation) and the pod's restart policy.
Where podman 4.3 does not, this script bridges, and says so when it runs:

- Services: podman plays no Service. Each pod joins one podman network (netavark, aardvark-dns)
  with a network alias for every Service whose selector matches its labels, so `draft-headless`
  resolves to the draft pod's IP, as a headless Service's name does in a cluster.
- `$(VAR)` in args: Kubernetes expands it from the container's environment; podman passes it on
  as it is. The script expands it with Kubernetes' rules before playing.
- Probes: podman ignores gRPC probes (and runs no periodic check without systemd). The script runs
  each startup probe itself against the pod's IP (gRPC health, the probe's service, period and
  failure threshold) and then the readiness probe once; liveness is not run.
- emptyDir: podman makes a named volume per emptyDir, named after the volume, so two pods'
  `cache` would be one volume; each is renamed `<deployment>-<volume>`.
- Models: the host's model cache ($PEARL_CACHE_DIR or ~/.cache/pearl, filled on the host first)
  is mounted read-only at the pods' PEARL_CACHE_DIR, over the cache emptyDir; in a cluster the
  cache is the emptyDir (fetched on first start) or a PersistentVolumeClaim.
- Ports: podman 4.3 publishes every containerPort on the host, where the pods' metrics ports
  (9464 each) collide; pods reach each other's ports on the network without that, so the
  containerPorts are dropped but the coordinator's gRPC and HTTP ports, published on
  127.0.0.1:PORT and 127.0.0.1:HTTP_PORT (hostPorts with hostIP).
- Not played: the OpenTelemetry collector and Jaeger (their images come from registries this
  machine cannot reach, so tracing is off: OTEL_TRACES_EXPORTER=none unless --set says
  otherwise), NetworkPolicies, PodDisruptionBudgets and the Namespace (no podman equivalents),
  preStop hooks (podman's stop sends SIGTERM; the servers drain on it).

Usage: deploy_local.py up [--port 50050] [--set KEY=VALUE ...] [--timeout S] | down | render
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / "build" / "deploy-local"
NETWORK = "pearl-local"
LABEL = "io.pearl.deploy-local"  # on the network; pods are found by the files played
PEARL_IMAGE_NAME = "pearl"  # the base's `images:` name; the overlay sets its tag
LOCAL_DEFAULTS = {"OTEL_TRACES_EXPORTER": "none"}  # no collector is played (see above)


def say(msg: str) -> None:
    print(f"deploy-local: {msg}", file=sys.stderr, flush=True)


def run(*cmd: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, text=True,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None)


def kubectl() -> str:
    venv = Path(sys.executable).parent / "kubectl"
    return str(venv) if venv.exists() else (shutil.which("kubectl") or "kubectl")


def render(overlay: str) -> list[dict]:
    """The overlay as `kubectl kustomize` renders it."""
    out = run(kubectl(), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)).stdout
    return [d for d in yaml.safe_load_all(out) if d]


# Kubernetes' $(VAR) expansion (k8s.io/kubernetes third_party/forked/golang/expansion): $(NAME)
# of a defined variable is replaced, $$ is a literal $, anything else stays as written.
_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(s: str, env: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _REF.sub(sub, s)


def container_env(c: dict, configmaps: dict[str, dict]) -> dict[str, str]:
    """The environment Kubernetes gives a container: envFrom first, then env (which wins)."""
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        ref = src.get("configMapRef")
        if ref:
            env.update(configmaps[ref["name"]].get("data", {}))
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
    return env


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def is_pearl(dep: dict) -> bool:
    containers = dep["spec"]["template"]["spec"]["containers"]
    return any(c["image"].split("/")[-1].split(":")[0] == PEARL_IMAGE_NAME for c in containers)


def play_objects(objs: list[dict], port: int, models_dir: Path, overrides: dict[str, str],
                 http_port: int | None = None
                 ) -> tuple[dict, list[tuple[dict, list[str]]], list[str]]:
    """(the ConfigMap, [(a Deployment to play, its Service aliases)], what was left out)."""
    configmaps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
    pearl_cm = next(cm for name, cm in configmaps.items() if name.startswith("pearl-config"))
    pearl_cm["data"].update(overrides)
    services = [o for o in objs if o["kind"] == "Service"]
    deployments = [o for o in objs if o["kind"] == "Deployment"]
    left_out = sorted({f"{o['kind']}/{o['metadata']['name']}" for o in objs
                       if o["kind"] not in ("ConfigMap", "Deployment", "Service")}
                      | {f"Deployment/{d['metadata']['name']}" for d in deployments if not is_pearl(d)})
    played = []
    for dep in (d for d in deployments if is_pearl(d)):
        name = dep["metadata"]["name"]
        pod = dep["spec"]["template"]
        spec = pod["spec"]
        for c in spec["containers"]:
            env = container_env(c, configmaps)
            c["args"] = [expand(a, env) for a in c.get("args", [])]
            if "command" in c:
                c["command"] = [expand(a, env) for a in c["command"]]
            if any(m["name"] == "cache" for m in c.get("volumeMounts", [])):
                c["volumeMounts"].append({"name": "models", "mountPath": env["PEARL_CACHE_DIR"],
                                          "readOnly": True})
            # podman 4.3 publishes every containerPort on the host (so the draft's and the target's
            # metrics ports, both 9464, would collide); pods reach each other's ports on the
            # network without it, so only the coordinator's gRPC port is kept, and published.
            published = {"grpc": port, "http": http_port} if name == "coordinator" else {}
            c["ports"] = [{**p, "hostPort": published[p["name"]], "hostIP": "127.0.0.1"}
                          for p in c.get("ports", []) if published.get(p.get("name"))]
            for m in c.get("volumeMounts", []):
                m["name"] = f"{name}-{m['name']}"
        for v in spec.get("volumes", []):
            v["name"] = f"{name}-{v['name']}"
        if any(m["name"] == f"{name}-models" for c in spec["containers"]
               for m in c.get("volumeMounts", [])):
            spec.setdefault("volumes", []).append(
                {"name": f"{name}-models", "hostPath": {"path": str(models_dir), "type": "Directory"}})
        labels = pod["metadata"].get("labels", {})
        aliases = [s["metadata"]["name"] for s in services if selects(s["spec"].get("selector"), labels)]
        played.append((dep, aliases))
    # the pods others dial by a Service name (draft, target) before those that dial them
    def dials(entry) -> bool:
        args = " ".join(a for c in entry[0]["spec"]["template"]["spec"]["containers"] for a in c["args"])
        return any(a in args for d, aliases in played if d is not entry[0] for a in aliases)
    return pearl_cm, sorted(played, key=dials), left_out


def pod_name(dep: dict) -> str:
    return f"{dep['metadata']['name']}-pod-0"  # podman kube play's name for a Deployment's pod


def pod_ip(pod: str) -> str:
    infra = run("podman", "pod", "inspect", pod, "--format", "{{.InfraContainerID}}").stdout.strip()
    nets = json.loads(run("podman", "inspect", infra, "--format",
                          "{{json .NetworkSettings.Networks}}").stdout)
    return nets[NETWORK]["IPAddress"]


def grpc_health(address: str, service: str, timeout_s: float) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return r.status == health_pb2.HealthCheckResponse.SERVING


def probe(dep: dict, kind: str, deadline: float) -> float:
    """Run a container's gRPC `kind` probe (startupProbe: until it passes, as the kubelet would,
    or the probe's failure budget or `deadline` runs out); seconds it took."""
    c = dep["spec"]["template"]["spec"]["containers"][0]
    p = c[kind]["grpc"]
    period = c[kind].get("periodSeconds", 10)
    budget = period * c[kind].get("failureThreshold", 3)
    pod = pod_name(dep)
    t0 = time.monotonic()
    while True:
        state = run("podman", "pod", "inspect", pod, "--format", "{{.State}}", check=False).stdout.strip()
        if state and grpc_health(f"{pod_ip(pod)}:{p['port']}", p.get("service", ""),
                                 c[kind].get("timeoutSeconds", 1)):
            return time.monotonic() - t0
        if time.monotonic() - t0 > budget or time.monotonic() > deadline:
            logs = run("podman", "logs", "--tail", "30", f"{pod}-{c['name']}", check=False)
            raise SystemExit(f"deploy-local: {pod}'s {kind} failed for "
                             f"{time.monotonic() - t0:.0f} s; its last log lines:\n"
                             f"{logs.stdout}{logs.stderr}")
        time.sleep(min(period, 2))


def fetch_models(names: list[str]) -> Path:
    """The host's model cache, with `names` converted in it (what the pods mount read-only)."""
    from specdec import model_store

    for name in names:
        if name in model_store.REGISTRY and not model_store.is_cached(name):
            say(f"fetching {name} into the host's model cache first")
            model_store.resolve(name)
        if name in model_store.REGISTRY:
            folder = model_store.default_cache_dir() / name
            if model_store.unreadable(folder):  # converted before the store shared its files
                say(f"making {folder} readable for the pods' user (uid 10001)")
                model_store.share(folder)
    return model_store.default_cache_dir().resolve()


def up(args) -> None:
    try:
        _up(args)
    except BaseException:
        if not args.keep:
            say("failed; taking down what was made (--keep leaves it for a look)")
            down(args)
        raise


def _up(args) -> None:
    t0 = time.monotonic()
    if run("bash", str(ROOT / "scripts" / "podman-setup.sh"), "--check", check=False).returncode:
        run("bash", str(ROOT / "scripts" / "podman-setup.sh"), capture=False)
    if (STATE / "played.json").exists():
        say("a deployment is already up; taking it down first")
        down(args)
    overrides = dict(LOCAL_DEFAULTS)
    for kv in args.set:
        key, sep, value = kv.partition("=")
        if not sep:
            raise SystemExit(f"deploy-local: --set wants KEY=VALUE, got {kv!r}")
        overrides[key] = value
    objs = render(args.overlay)
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("pearl-config"))
    data = {**cm["data"], **overrides}
    models_dir = fetch_models([data["DRAFT_MODEL"], data["TARGET_MODEL"]])
    pearl_cm, played, left_out = play_objects(objs, args.port, models_dir, overrides,
                                              args.http_port)
    images = {c["image"] for d, _ in played for c in d["spec"]["template"]["spec"]["containers"]}
    for image in images:
        if run("podman", "image", "exists", image, check=False).returncode:
            raise SystemExit(f"deploy-local: no image {image}; build it first: make image")
    say(f"not played (no podman equivalent, or no image here): {', '.join(left_out)}")
    say(f"ConfigMap overrides for this machine: {overrides}")

    STATE.mkdir(parents=True, exist_ok=True)
    if run("podman", "network", "exists", NETWORK, check=False).returncode:
        run("podman", "network", "create", "--label", LABEL, NETWORK)
    files = []
    for dep, aliases in played:
        f = STATE / f"{dep['metadata']['name']}.yaml"
        f.write_text(yaml.safe_dump_all([pearl_cm, dep], sort_keys=False))
        files.append(str(f))
        (STATE / "played.json").write_text(json.dumps(files))
        net = NETWORK + (":" + ",".join(f"alias={a}" for a in aliases) if aliases else "")
        say(f"podman kube play {f.relative_to(ROOT)} (Services as aliases: {', '.join(aliases) or 'none'})")
        r = run("podman", "kube", "play", "--network", net, str(f), check=False)
        if r.returncode:
            raise SystemExit(f"deploy-local: podman kube play failed:\n{r.stdout}{r.stderr}")
    deadline = time.monotonic() + args.timeout
    for dep, _ in played:
        s = probe(dep, "startupProbe", deadline)
        probe(dep, "readinessProbe", deadline)
        say(f"{pod_name(dep)} ready ({s:.0f} s after its start probe began)")
    address = f"127.0.0.1:{args.port}"
    if not grpc_health(address, "pearl.v1.Coordinator", 5):
        raise SystemExit(f"deploy-local: the coordinator is ready on its pod IP but not on {address}")
    say(f"up in {time.monotonic() - t0:.0f} s; the coordinator is at {address} (gRPC) and "
        f"http://127.0.0.1:{args.http_port}/v1 (OpenAI API):\n"
        f"  .venv/bin/pearl generate 'def fib(n):' --coordinator {address}\n"
        f"  curl -N http://127.0.0.1:{args.http_port}/v1/completions -H 'Content-Type: "
        f"application/json' -d '{{\"model\": \"{data['TARGET_MODEL']}\", \"prompt\": "
        f"\"def fib(n):\", \"max_tokens\": 32, \"stream\": true}}'")


def down(args) -> None:
    files = json.loads((STATE / "played.json").read_text()) if (STATE / "played.json").exists() else []
    for f in reversed(files):
        if Path(f).exists():
            r = run("podman", "kube", "down", f, check=False)
            if r.returncode and "no such" not in r.stderr:
                say(f"podman kube down {f}: {r.stderr.strip()}")
    if not run("podman", "network", "exists", NETWORK, check=False).returncode:
        run("podman", "network", "rm", "-f", NETWORK)
    shutil.rmtree(STATE, ignore_errors=True)
    say("down: pods, their containers and volumes, and the network removed")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("up", "render"):
        p = sub.add_parser(name)
        p.add_argument("--overlay", default="cpu-dev")
        p.add_argument("--port", type=int, default=int(os.environ.get("LOCAL_PORT", 50050)),
                       help="the coordinator's port on 127.0.0.1 (env LOCAL_PORT)")
        p.add_argument("--http-port", type=int, default=int(os.environ.get("LOCAL_HTTP_PORT", 8000)),
                       help="the coordinator's HTTP (OpenAI API) port on 127.0.0.1 "
                            "(env LOCAL_HTTP_PORT)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a pearl-config key (e.g. DTYPE=float32)")
        p.add_argument("--timeout", type=float, default=1200, help="seconds to wait for readiness")
        p.add_argument("--keep", action="store_true", help="leave a failed deployment up")
    sub.add_parser("down")
    args = ap.parse_args(argv)
    if args.cmd == "up":
        up(args)
    elif args.cmd == "down":
        down(args)
    else:
        _, played, _ = play_objects(render(args.overlay), args.port, Path("/models"),
                                    dict(LOCAL_DEFAULTS), args.http_port)
        print(yaml.safe_dump_all([d for d, _ in played], sort_keys=False))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
