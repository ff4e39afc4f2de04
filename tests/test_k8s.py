"""The Kubernetes manifests (k8s/) render, validate against the Kubernetes schemas, and agree with
the code: the container args parse with the real `pearl serve` parser, ports and probes match what
the servers listen on and register, the gpu overlay keeps draft and target on distinct GPU nodes,
and only the coordinator may reach draft and target.

Needs kubectl and kubernetes-validate (`make k8s-tools`); without them these tests fail, they do
not skip.
"""

import argparse
import contextlib
import importlib.util
import io
import os
import re
import subprocess
from pathlib import Path
from unittest import mock

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pearl import cli
from protos.v1 import pearl_pb2
from specdec import model_store

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("k8s_validate", ROOT / "k8s" / "validate.py")
validate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(validate)

OVERLAYS = validate.overlays()
ROLES = ("draft", "target", "coordinator")
# the service each role's server registers with the health service, as the proto names it
PROTO_SERVICE = {"draft": "DraftService", "target": "TargetService", "coordinator": "Coordinator"}
PEARL_NAME = {"app.kubernetes.io/name": "pearl"}
STARTUP_MIN_S = 15 * 60
GPU = "nvidia.com/gpu"

_rendered: dict[str, list[dict]] = {}


def render(overlay: str) -> list[dict]:
    if overlay not in _rendered:
        missing = None
        try:
            _rendered[overlay] = validate.render(overlay)
        except validate.ToolMissing as e:
            missing = str(e)
        if missing:
            pytest.fail(missing, pytrace=False)
    return _rendered[overlay]


# ---- reading rendered objects -------------------------------------------------------------------

def of_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def pod_labels(dep):
    return dep["spec"]["template"]["metadata"].get("labels", {})


def selects(selector, labels) -> bool:
    """Kubernetes LabelSelector semantics ({} selects everything)."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if (op == "In" and labels.get(key) not in values
                or op == "NotIn" and key in labels and labels[key] in values
                or op == "Exists" and key not in labels
                or op == "DoesNotExist" and key in labels):
            return False
    return True


def service_selects(svc, labels) -> bool:
    """A Service's selector is a plain map; an empty or missing one selects no pods."""
    sel = svc["spec"].get("selector") or {}
    return bool(sel) and all(labels.get(k) == v for k, v in sel.items())


def role_deployment(objs, role):
    found = [d for d in of_kind(objs, "Deployment")
             if selects({"matchLabels": {**PEARL_NAME, "app.kubernetes.io/component": role}},
                        pod_labels(d))]
    assert len(found) == 1, f"expected one Deployment of {role} pods, found {len(found)}"
    return found[0]


def the_container(dep):
    containers = dep["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{dep['metadata']['name']}: one container expected"
    return containers[0]


def container_env(objs, container) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom first, then env."""
    maps = {m["metadata"]["name"]: m.get("data", {}) for m in of_kind(objs, "ConfigMap")}
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        name = src["configMapRef"]["name"]
        assert name in maps, f"envFrom names ConfigMap {name}, which the overlay does not render"
        env.update({src.get("prefix", "") + k: v for k, v in maps[name].items()})
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        else:
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = maps[ref["name"]][ref["key"]]
    return env


def expand(s: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion; $$ escapes, an undefined $(VAR) stays as it is."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), s)


def serve_args(objs, role) -> tuple[list[str], dict[str, str]]:
    """The argv after the image's `pearl` entrypoint, expanded, and the container's env."""
    c = the_container(role_deployment(objs, role))
    assert c.get("command") in (None, ["pearl"]), \
        f"{role}: command {c.get('command')} would replace the image's `pearl` entrypoint"
    env = container_env(objs, c)
    args = [expand(a, env) for a in c.get("args", [])]
    unresolved = [a for a in args if "$(" in a]
    assert not unresolved, f"{role}: args name variables the container lacks: {unresolved}"
    return args, env


def parse_serve(objs, role) -> argparse.Namespace:
    """Parse the container's args with the real CLI parser, under the container's environment
    (the CLI's defaults fall back to PEARL_* variables)."""
    args, env = serve_args(objs, role)
    with mock.patch.dict(os.environ, env, clear=True):
        parser = argparse.ArgumentParser(prog="pearl")
        sub = parser.add_subparsers(required=True)
        cli.add_serve(sub)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                a = parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{role}: `pearl {' '.join(args)}` does not parse:\n{err.getvalue()}")
    assert a.fn is cli.cmd_serve and a.role == role, f"{role}: args {args} do not serve {role}"
    return a


def listen_port(a) -> int:
    """The port `pearl serve` binds, as cmd_serve computes it."""
    return cli.DEFAULT_PORTS[a.role] if a.port is None else int(a.port)


def prestop_seconds(container) -> float:
    pre = container.get("lifecycle", {}).get("preStop")
    if pre is None:
        return 0
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    cmd = pre.get("exec", {}).get("command", [])
    assert len(cmd) == 2 and cmd[0] == "sleep", \
        f"preStop {pre}: only a plain sleep is known not to break the drain"
    return float(cmd[1])


def health_name(role) -> str:
    return pearl_pb2.DESCRIPTOR.services_by_name[PROTO_SERVICE[role]].full_name


# ---- rendering and schemas ----------------------------------------------------------------------

def test_the_overlays_exist():
    assert {"gpu", "cpu-dev"} <= set(OVERLAYS), OVERLAYS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    objs = render(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    errors = validate.validate_objects(objs)
    assert not errors, "\n".join(errors)


def test_validation_catches_a_broken_object():
    """The validator is strict: an unknown field and a wrong type are errors."""
    dep = role_deployment(render(OVERLAYS[0]), "draft")
    assert not validate.validate_objects([dep])
    typo, wrong_type = (yaml.safe_load(yaml.safe_dump(dep)) for _ in range(2))
    c = typo["spec"]["template"]["spec"]["containers"][0]
    c["readinessProbes"] = c.pop("readinessProbe")
    errors = validate.validate_objects([typo])
    assert errors and all("readinessProbes" in e for e in errors), errors
    wrong_type["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"]["port"] = "grpc"
    errors = validate.validate_objects([wrong_type])
    assert errors and all("startupProbe.grpc.port" in e for e in errors), errors


# ---- the manifests agree with `pearl serve` ----------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("role", ROLES)
def test_args_ports_and_probes_match_the_cli(overlay, role):
    objs = render(overlay)
    a = parse_serve(objs, role)
    port = listen_port(a)
    dep = role_deployment(objs, role)
    c = the_container(dep)
    assert [p["containerPort"] for p in c["ports"]] == [port], \
        f"{role}: containerPorts {c['ports']} but `pearl serve` listens on {port}"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c.get(kind)
        assert probe and "grpc" in probe, f"{role}: no gRPC {kind}"
        assert probe["grpc"]["port"] == port, \
            f"{role}: {kind} on {probe['grpc']['port']}, not {port}"
        assert probe["grpc"].get("service") == health_name(role), \
            f"{role}: {kind} asks for {probe['grpc'].get('service')!r}, the server registers " \
            f"{health_name(role)!r}"
    # the Service in front of it reaches that port
    named = {p.get("name"): p["containerPort"] for p in c["ports"]}
    services = [s for s in of_kind(objs, "Service") if service_selects(s, pod_labels(dep))]
    assert len(services) == 1, f"{role}: {len(services)} Services select its pods"
    for sp in services[0]["spec"]["ports"]:
        target = sp.get("targetPort", sp["port"])
        assert named.get(target, target) == port, f"{role}: Service port {sp} misses {port}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_coordinator_points_at_the_draft_and_target_services(overlay):
    objs = render(overlay)
    a = parse_serve(objs, "coordinator")
    services = {s["metadata"]["name"]: s for s in of_kind(objs, "Service")}
    for role, addr in (("draft", a.draft), ("target", a.target)):
        assert addr, f"coordinator: no --{role} address"
        host, _, port = addr.rpartition(":")
        name = host.split(".")[0]
        assert name in services, f"--{role} {addr}: no Service {name!r}"
        svc = services[name]
        assert service_selects(svc, pod_labels(role_deployment(objs, role))), \
            f"--{role} {addr}: Service {name} does not select the {role} pods"
        assert int(port) in [p["port"] for p in svc["spec"]["ports"]], \
            f"--{role} {addr}: Service {name} has no port {port}"
        assert int(port) == listen_port(parse_serve(objs, role))


@pytest.mark.parametrize("role", ROLES)
def test_probe_names_are_what_the_servers_register(role, cluster):
    """Ask the real servers' health service for the names the probes use: SERVING."""
    names = {the_container(role_deployment(render(o), role))[kind]["grpc"]["service"]
             for o in OVERLAYS for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    address = {"draft": cluster.draft_address, "target": cluster.target_address,
               "coordinator": cluster.address}[role]
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in names:
            r = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING, (role, name, r)


# ---- shutdown, startup, security, resources ----------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("role", ROLES)
def test_graceful_shutdown_and_slow_start_fit(overlay, role):
    objs = render(overlay)
    a = parse_serve(objs, role)
    pod = role_deployment(objs, role)["spec"]["template"]["spec"]
    c = the_container(role_deployment(objs, role))
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    drain = prestop_seconds(c) + a.grace
    assert tgps > drain, \
        f"{role}: terminationGracePeriodSeconds {tgps} <= preStop + --grace = {drain}"
    live = c["livenessProbe"]
    assert live.get("periodSeconds", 10) * live.get("failureThreshold", 3) > drain, \
        f"{role}: liveness would restart a pod that is still draining (NOT_SERVING)"
    start = c["startupProbe"]
    assert start.get("periodSeconds", 10) * start.get("failureThreshold", 3) >= STARTUP_MIN_S, \
        f"{role}: startup probe gives model loading less than {STARTUP_MIN_S} s"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("role", ROLES)
def test_non_root_read_only_with_writable_volumes(overlay, role):
    objs = render(overlay)
    dep = role_deployment(objs, role)
    pod = dep["spec"]["template"]["spec"]
    c = the_container(dep)
    sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
    assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 1) != 0
    assert sc.get("readOnlyRootFilesystem") is True
    assert sc.get("allowPrivilegeEscalation") is False
    assert "ALL" in sc.get("capabilities", {}).get("drop", [])
    writable = {v["name"] for v in pod.get("volumes", [])
                if "emptyDir" in v or "persistentVolumeClaim" in v or "ephemeral" in v}
    mounts = [m["mountPath"].rstrip("/") for m in c.get("volumeMounts", [])
              if m["name"] in writable and not m.get("readOnly")]
    _, env = serve_args(objs, role)
    paths = ["/tmp"] + ([env["PEARL_CACHE_DIR"], env["HF_HOME"]] if role != "coordinator" else [])
    for path in paths:
        assert any(path == m or path.startswith(m + "/") for m in mounts), \
            f"{role}: {path} is not on a writable volume (mounts {mounts})"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(overlay):
    for dep in of_kind(render(overlay), "Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), \
                    f"{dep['metadata']['name']}/{c['name']}: {part} {res.get(part)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("role", ROLES)
def test_a_disruption_budget_covers_each_service(overlay, role):
    objs = render(overlay)
    labels = pod_labels(role_deployment(objs, role))
    assert any(selects(p["spec"]["selector"], labels) for p in of_kind(objs, "PodDisruptionBudget"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_traces_go_to_the_collector_and_on_to_jaeger(overlay):
    objs = render(overlay)
    services = {s["metadata"]["name"]: s for s in of_kind(objs, "Service")}
    names = set()
    for role in ROLES:
        _, env = serve_args(objs, role)
        m = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", env.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
        assert m, f"{role}: OTEL_EXPORTER_OTLP_ENDPOINT {env.get('OTEL_EXPORTER_OTLP_ENDPOINT')!r}"
        assert m.group(1) == "otel-collector" and m.group(2) == "4317"
        assert int(m.group(2)) in [p["port"] for p in services["otel-collector"]["spec"]["ports"]]
        names.add(env.get("OTEL_SERVICE_NAME"))
    assert len(names) == 3 and None not in names, f"OTEL_SERVICE_NAME per service: {names}"
    collector = next(m for m in of_kind(objs, "ConfigMap")
                     if m["metadata"]["name"].startswith("otel-collector-config"))
    conf = yaml.safe_load(collector["data"]["config.yaml"])
    assert conf["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    exporters = conf["service"]["pipelines"]["traces"]["exporters"]
    endpoints = [conf["exporters"][e]["endpoint"] for e in exporters if e.split("/")[0] == "otlp"]
    assert "jaeger:4317" in endpoints, endpoints
    assert 4317 in [p["port"] for p in services["jaeger"]["spec"]["ports"]]
    assert 16686 in [p["port"] for p in services["jaeger"]["spec"]["ports"]]


# ---- network policies --------------------------------------------------------------------------

def ingress_policies_for(objs, labels):
    return [p for p in of_kind(objs, "NetworkPolicy")
            if selects(p["spec"]["podSelector"], labels)
            and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]


def all_pod_labels(objs) -> dict[str, dict]:
    return {d["metadata"]["name"]: pod_labels(d) for d in of_kind(objs, "Deployment")}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("role", ["draft", "target"])
def test_only_the_coordinator_reaches_draft_and_target(overlay, role):
    objs = render(overlay)
    port = listen_port(parse_serve(objs, role))
    c = the_container(role_deployment(objs, role))
    named = {p.get("name"): p["containerPort"] for p in c["ports"]}
    coordinator = pod_labels(role_deployment(objs, "coordinator"))
    pods = all_pod_labels(objs)
    policies = ingress_policies_for(objs, pod_labels(role_deployment(objs, role)))
    assert policies, f"no NetworkPolicy isolates the {role} pods: anything may reach them"
    admits_coordinator = False
    for pol in policies:
        for rule in pol["spec"].get("ingress", []):
            where = f"{pol['metadata']['name']}: {rule}"
            assert rule.get("from"), f"{where} admits every source"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"{where}: only pods of this namespace may"
                matched = {n for n, lab in pods.items() if selects(peer["podSelector"], lab)}
                assert matched == {role_deployment(objs, "coordinator")["metadata"]["name"]}, \
                    f"{where} admits {sorted(matched)}, not just the coordinator"
            ports = rule.get("ports")
            assert ports, f"{where} admits every port"
            for p in ports:
                assert named.get(p.get("port"), p.get("port")) == port and \
                    p.get("protocol", "TCP") == "TCP" and "endPort" not in p, \
                    f"{where} opens {p}, not the gRPC port {port}"
            admits_coordinator |= any(selects(peer["podSelector"], coordinator)
                                      for peer in rule["from"])
    assert admits_coordinator, f"the coordinator cannot reach the {role}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_clients_reach_the_coordinator_and_it_reaches_out(overlay):
    objs = render(overlay)
    port = listen_port(parse_serve(objs, "coordinator"))
    labels = pod_labels(role_deployment(objs, "coordinator"))
    rules = [r for p in ingress_policies_for(objs, labels) for r in p["spec"].get("ingress", [])]
    assert any(not r.get("from") and port in [p.get("port") for p in r.get("ports", [])]
               for r in rules), f"no policy lets clients reach the coordinator on {port}"
    for pol in of_kind(objs, "NetworkPolicy"):
        if selects(pol["spec"]["podSelector"], labels):
            assert "Egress" not in pol["spec"].get("policyTypes", []), \
                f"{pol['metadata']['name']} restricts the coordinator's egress"
    # spans from the three services reach the collector
    collector = pod_labels(next(d for d in of_kind(objs, "Deployment")
                                if d["metadata"]["name"] == "otel-collector"))
    rules = [r for p in ingress_policies_for(objs, collector) for r in p["spec"].get("ingress", [])]
    for role in ROLES:
        lab = pod_labels(role_deployment(objs, role))
        assert any(4317 in [p.get("port") for p in r.get("ports", [])]
                   and any(selects(peer.get("podSelector"), lab) for peer in r.get("from", []))
                   for r in rules), f"{role} cannot send spans to the collector"


# ---- overlays ----------------------------------------------------------------------------------

def node_affinity_admits(pod_spec, node_labels) -> bool:
    if not all(node_labels.get(k) == v for k, v in pod_spec.get("nodeSelector", {}).items()):
        return False
    required = (pod_spec.get("affinity", {}).get("nodeAffinity", {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if not required:
        return True
    return any(selects({"matchExpressions": t.get("matchExpressions", [])}, node_labels)
               for t in required["nodeSelectorTerms"])


@pytest.mark.parametrize("role", ["draft", "target"])
def test_gpu_overlay_places_draft_and_target_on_distinct_gpu_nodes(role):
    objs = render("gpu")
    other = "target" if role == "draft" else "draft"
    dep = role_deployment(objs, role)
    pod = dep["spec"]["template"]["spec"]
    res = the_container(dep)["resources"]
    for part in ("requests", "limits"):
        assert str(res.get(part, {}).get(GPU)) == "1", f"{role}: {part} {res.get(part)}"
    assert node_affinity_admits(pod, {f"{GPU}.present": "true"}), f"{role}: GPU nodes refused"
    for node in ({}, {f"{GPU}.present": "false"}):
        assert not node_affinity_admits(pod, node), f"{role}: may land on a node {node} (no GPU)"
    assert any(t.get("key") == GPU and t.get("operator") in ("Exists", "Equal")
               for t in pod.get("tolerations", [])), f"{role}: does not tolerate the GPU taint"
    terms = (pod.get("affinity", {}).get("podAntiAffinity", {})
             .get("requiredDuringSchedulingIgnoredDuringExecution", []))
    ns = dep["metadata"].get("namespace")
    assert any(t.get("topologyKey") == "kubernetes.io/hostname"
               and selects(t.get("labelSelector"), pod_labels(role_deployment(objs, other)))
               and t.get("namespaces", [ns]) == [ns] and "namespaceSelector" not in t
               for t in terms), f"{role}: no required anti-affinity to {other} pods per node"
    a = parse_serve(objs, role)
    assert (a.device, a.dtype) == ("cuda", "bfloat16"), (a.device, a.dtype)
    assert a.model and a.model.startswith("Qwen/"), f"{role}: production model {a.model!r}"
    coordinator = the_container(role_deployment(objs, "coordinator"))["resources"]
    assert GPU not in coordinator.get("requests", {}) and GPU not in coordinator.get("limits", {})


def test_gpu_overlay_pairs_a_small_draft_with_a_large_target():
    objs = render("gpu")
    draft, target = parse_serve(objs, "draft").model, parse_serve(objs, "target").model
    size = lambda m: float(re.search(r"(\d+(?:\.\d+)?)B", m).group(1))  # noqa: E731
    assert size(draft) < size(target), (draft, target)


def test_cpu_dev_overlay_is_the_small_default_pair_on_cpu():
    objs = render("cpu-dev")
    for role in ("draft", "target"):
        a = parse_serve(objs, role)
        assert a.device == "cpu" and int(a.threads) == 1, (role, a.device, a.threads)
        model = a.model or cli.DEFAULT_MODELS[role]
        assert model == cli.DEFAULT_MODELS[role] and model in model_store.REGISTRY, model
        res = the_container(role_deployment(objs, role))["resources"]
        assert GPU not in res.get("requests", {}) and GPU not in res.get("limits", {})
    for role in ROLES:
        assert role_deployment(objs, role)["spec"].get("replicas", 1) == 1


# ---- the image and the make targets ------------------------------------------------------------

def test_dockerfile_runs_pearl_as_non_root_with_the_pinned_torch():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["pearl"\]$', text, re.M), "ENTRYPOINT must be pearl"
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    m = re.search(r"^ARG TORCH_SPEC=(\S+)$", text, re.M)
    pin = re.search(r'^\s*"(torch==[^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    torch_pin = pin and pin.group(1)
    assert m and m.group(1) == torch_pin, f"Dockerfile TORCH_SPEC {m and m.group(1)} vs {torch_pin}"
    # the image's cache paths are where the pods mount their volumes
    env = dict(re.findall(r"(PEARL_CACHE_DIR|HF_HOME)=(\S+)", text))
    _, pod_env = serve_args(render(OVERLAYS[0]), "draft")
    assert env == {k: pod_env[k] for k in env} and len(env) == 2, (env, pod_env)


def test_make_deploy_applies_the_chosen_overlay():
    out = subprocess.run(["make", "-n", "deploy", "OVERLAY=gpu"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "kubectl apply -k k8s/overlays/gpu" in out, out
