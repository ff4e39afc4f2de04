"""The Kubernetes manifests (k8s/) render, validate against the Kubernetes schemas, and agree with
the code: the container args parse with the real `pearl serve` parser, ports and probes match what
the servers listen on and register, the gpu overlay keeps draft and target on distinct GPU nodes,
only the coordinator may reach draft and target on their gRPC ports (Prometheus, from namespace
`monitoring`, only their metrics port), the coordinator finds every draft and target pod through
headless Services, and the gpu overlay scales draft and target on the sessions they export, with
disruption budgets that keep serving through a node drain.

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

from coordinator.replicas import parse_address
from pearl import cli
from protos.v1 import pearl_pb2
from specdec import model_store
from specdec.telemetry import Telemetry

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
# who scrapes /metrics (networkpolicies.yaml): Prometheus's pods in namespace `monitoring`
MONITORING_NS = "monitoring"
PROMETHEUS_POD = {"app.kubernetes.io/name": "prometheus"}

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
    ports = {p.get("name"): p["containerPort"] for p in c["ports"]}
    listens = {"grpc": port, "metrics": a.metrics_port}
    if a.http_port is not None:
        listens["http"] = int(a.http_port)
    assert ports == listens, \
        f"{role}: containerPorts {c['ports']} but `pearl serve` listens on {listens}"
    assert (a.http_port is not None) == (role == "coordinator"), "HTTP is the coordinator's"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c.get(kind)
        assert probe and "grpc" in probe, f"{role}: no gRPC {kind}"
        assert probe["grpc"]["port"] == port, \
            f"{role}: {kind} on {probe['grpc']['port']}, not {port}"
        assert probe["grpc"].get("service") == health_name(role), \
            f"{role}: {kind} asks for {probe['grpc'].get('service')!r}, the server registers " \
            f"{health_name(role)!r}"
    # the Service in front of it reaches the gRPC port
    named = ports
    services = [s for s in of_kind(objs, "Service") if service_selects(s, pod_labels(dep))]
    assert len(services) == 1, f"{role}: {len(services)} Services select its pods"
    for sp in services[0]["spec"]["ports"]:
        target = sp.get("targetPort", sp["port"])
        want = named.get(sp["name"])
        assert named.get(target, target) == want and want in (port, named.get("http")), \
            f"{role}: Service port {sp} misses the {sp['name']} port {want}"


def namespace_of(obj) -> str:
    return obj["metadata"].get("namespace", "default")


def service_for_host(host: str, services: dict, ns: str):
    """The Service a name resolves to from a pod in namespace ``ns``: NAME (the pod's namespace
    is searched first), NAME.NS, NAME.NS.svc or NAME.NS.svc.cluster.local; None otherwise."""
    name, *rest = host.split(".")
    if rest in ([], [ns], [ns, "svc"], [ns, "svc", "cluster", "local"]):
        return services.get(name)
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_coordinator_points_at_the_headless_services(overlay):
    """--draft and --target are dns:/// names of headless Services (clusterIP None) that select
    exactly that role's pods on its gRPC port: the name resolves to every ready pod and the
    coordinator spreads sessions over them. A ClusterIP name would be one replica to it (one
    connection to one pod), a plain host:port too."""
    objs = render(overlay)
    a = parse_serve(objs, "coordinator")
    ns = namespace_of(role_deployment(objs, "coordinator"))
    services = {s["metadata"]["name"]: s for s in of_kind(objs, "Service")
                if namespace_of(s) == ns}
    pods = all_pod_labels(objs)
    for role, addr in (("draft", a.draft), ("target", a.target)):
        assert addr, f"coordinator: no --{role} address"
        t = parse_address(addr)  # the coordinator's own parser
        assert t.dynamic, f"--{role} {addr}: not a dns: name, so the coordinator sees one replica"
        svc = service_for_host(t.host, services, ns)
        assert svc is not None, f"--{role} {addr}: {t.host} is no Service of namespace {ns}"
        name = svc["metadata"]["name"]
        assert svc["spec"].get("clusterIP") == "None", \
            f"--{role} {addr}: Service {name} is not headless (clusterIP None): its name is one " \
            f"virtual IP, and every session would land on one pod"
        assert not svc["spec"].get("publishNotReadyAddresses"), \
            f"{name} lists pods that are not ready (starting, draining)"
        selected = {n for n, lab in pods.items() if service_selects(svc, lab)}
        assert selected == {role_deployment(objs, role)["metadata"]["name"]}, \
            f"--{role} {addr}: Service {name} selects the pods of {sorted(selected)}"
        assert t.port in [p["port"] for p in svc["spec"]["ports"]], \
            f"--{role} {addr}: Service {name} has no port {t.port}"
        assert t.port == listen_port(parse_serve(objs, role))


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


def autoscaler_of(objs, dep):
    """The HorizontalPodAutoscaler that scales ``dep``, or None."""
    found = [h for h in of_kind(objs, "HorizontalPodAutoscaler")
             if h["spec"]["scaleTargetRef"].get("kind") == "Deployment"
             and h["spec"]["scaleTargetRef"].get("apiVersion", "apps/v1") == "apps/v1"
             and h["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
             and namespace_of(h) == namespace_of(dep)]
    assert len(found) <= 1, f"{dep['metadata']['name']}: {len(found)} autoscalers fight over it"
    return found[0] if found else None


def replica_floor(objs, role) -> int:
    """The fewest pods ``role`` runs: its autoscaler's minReplicas, else its replicas."""
    dep = role_deployment(objs, role)
    hpa = autoscaler_of(objs, dep)
    return hpa["spec"].get("minReplicas", 1) if hpa else dep["spec"].get("replicas", 1)


def scaled(value, replicas: int) -> int:
    """A PodDisruptionBudget's minAvailable/maxUnavailable for ``replicas`` pods (a percentage
    rounds up, as the disruption controller does)."""
    if isinstance(value, str) and value.endswith("%"):
        return -(-int(value[:-1]) * replicas // 100)
    return int(value)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("role", ROLES)
def test_disruption_budgets_keep_serving_through_a_node_drain(overlay, role):
    """One budget per service: at its fewest pods a drain may always evict one (a budget that
    allows none blocks the drain forever) and, with two or more, at least one keeps serving."""
    objs = render(overlay)
    labels = pod_labels(role_deployment(objs, role))
    pdbs = [p for p in of_kind(objs, "PodDisruptionBudget")
            if selects(p["spec"]["selector"], labels)]
    assert len(pdbs) == 1, f"{role}: {len(pdbs)} PodDisruptionBudgets select its pods"
    spec, n = pdbs[0]["spec"], replica_floor(objs, role)
    others = {d for d, lab in all_pod_labels(objs).items() if selects(spec["selector"], lab)}
    assert others == {role_deployment(objs, role)["metadata"]["name"]}, \
        f"{pdbs[0]['metadata']['name']} budgets the pods of {sorted(others)} together"
    if "maxUnavailable" in spec:
        evictable = scaled(spec["maxUnavailable"], n)
    else:
        evictable = n - scaled(spec.get("minAvailable", 1), n)
    assert evictable >= 1, f"{role}: with {n} pods the budget {spec} lets no drain evict one"
    if n > 1:
        assert n - evictable >= 1, f"{role}: with {n} pods the budget {spec} lets a drain take all"


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


def peer_admits(peer, policy_ns: str, ns: str, labels: dict) -> bool:
    """Whether a NetworkPolicy peer admits a pod with ``labels`` in namespace ``ns`` (namespaces
    carry the label kubernetes.io/metadata.name; an ipBlock is taken to admit anything)."""
    if "ipBlock" in peer:
        return True
    if "namespaceSelector" in peer:
        ns_ok = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": ns})
    else:
        ns_ok = ns == policy_ns
    return ns_ok and ("podSelector" not in peer or selects(peer["podSelector"], labels))


def rule_ports(rule, container) -> set[int] | None:
    """The container ports a rule opens (named ports resolved); None: every port."""
    if not rule.get("ports"):
        return None
    named = {p.get("name"): p["containerPort"] for p in container["ports"]}
    for p in rule["ports"]:
        assert p.get("protocol", "TCP") == "TCP" and "endPort" not in p, f"rule opens {p}"
    return {named.get(p.get("port"), p.get("port")) for p in rule["ports"]}


def assert_only_prometheus(objs, pol, rule, where: str) -> None:
    """Every peer of ``rule`` admits Prometheus's pods in the monitoring namespace and nothing
    else tried: no pod of the PEARL namespace, no Prometheus elsewhere, no other monitoring pod."""
    ns = namespace_of(pol)
    assert rule.get("from"), f"{where} admits every source"
    for peer in rule["from"]:
        assert peer_admits(peer, ns, MONITORING_NS, PROMETHEUS_POD), \
            f"{where}: {peer} does not admit Prometheus in {MONITORING_NS}"
        for name, labels in all_pod_labels(objs).items():
            assert not peer_admits(peer, ns, ns, labels), f"{where}: {peer} admits {name} pods"
        assert not peer_admits(peer, ns, "default", PROMETHEUS_POD), \
            f"{where}: {peer} admits Prometheus pods of any namespace"
        assert not peer_admits(peer, ns, MONITORING_NS, {"app.kubernetes.io/name": "grafana"}), \
            f"{where}: {peer} admits every pod of {MONITORING_NS}"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("role", ["draft", "target"])
def test_only_the_coordinator_reaches_draft_and_target(overlay, role):
    """The gRPC port admits the coordinator's pods and nothing else; the only other rule a draft
    or target may have opens its metrics port, to Prometheus in the monitoring namespace."""
    objs = render(overlay)
    a = parse_serve(objs, role)
    port, metrics = listen_port(a), a.metrics_port
    c = the_container(role_deployment(objs, role))
    coordinator = pod_labels(role_deployment(objs, "coordinator"))
    pods = all_pod_labels(objs)
    policies = ingress_policies_for(objs, pod_labels(role_deployment(objs, role)))
    assert policies, f"no NetworkPolicy isolates the {role} pods: anything may reach them"
    admits_coordinator = False
    for pol in policies:
        for rule in pol["spec"].get("ingress", []):
            where = f"{pol['metadata']['name']}: {rule}"
            ports = rule_ports(rule, c)
            assert ports, f"{where} admits every port"
            if port not in ports:
                assert ports == {metrics}, f"{where} opens {ports}: neither gRPC nor metrics"
                assert_only_prometheus(objs, pol, rule, where)
                continue
            assert ports == {port}, f"{where} opens {ports} together with the gRPC port {port}"
            assert rule.get("from"), f"{where} admits every source"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"{where}: only pods of this namespace may"
                matched = {n for n, lab in pods.items() if selects(peer["podSelector"], lab)}
                assert matched == {role_deployment(objs, "coordinator")["metadata"]["name"]}, \
                    f"{where} admits {sorted(matched)}, not just the coordinator"
            admits_coordinator |= any(selects(peer["podSelector"], coordinator)
                                      for peer in rule["from"])
    assert admits_coordinator, f"the coordinator cannot reach the {role}"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("role", ROLES)
def test_prometheus_scrapes_the_metrics_port_and_only_prometheus_may(overlay, role):
    """`pearl serve --metrics-port` is the pod's `metrics` port and its prometheus.io/port
    annotation; a NetworkPolicy lets Prometheus (monitoring namespace) reach it, and every rule
    that opens it admits Prometheus only."""
    objs = render(overlay)
    a = parse_serve(objs, role)
    assert a.metrics_port, f"{role}: no --metrics-port, so no pearl_active_sessions to scale on"
    dep = role_deployment(objs, role)
    c = the_container(dep)
    ann = dep["spec"]["template"]["metadata"].get("annotations", {})
    assert ann.get("prometheus.io/scrape") == "true", f"{role}: pod annotations {ann}"
    assert ann.get("prometheus.io/port") == str(a.metrics_port), \
        f"{role}: Prometheus would scrape port {ann.get('prometheus.io/port')}, the service " \
        f"serves /metrics on {a.metrics_port}"
    assert ann.get("prometheus.io/path", "/metrics") == "/metrics", ann
    reachable = False
    for pol in ingress_policies_for(objs, pod_labels(dep)):
        for rule in pol["spec"].get("ingress", []):
            ports = rule_ports(rule, c)
            if ports is not None and a.metrics_port not in ports:
                continue
            where = f"{pol['metadata']['name']}: {rule}"
            assert_only_prometheus(objs, pol, rule, where)
            reachable = True
    assert reachable, f"no NetworkPolicy lets Prometheus reach the {role}'s port {a.metrics_port}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_clients_reach_the_coordinator_and_it_reaches_out(overlay):
    objs = render(overlay)
    a = parse_serve(objs, "coordinator")
    ports = [listen_port(a), int(a.http_port)]
    labels = pod_labels(role_deployment(objs, "coordinator"))
    rules = [r for p in ingress_policies_for(objs, labels) for r in p["spec"].get("ingress", [])]
    for port in ports:
        assert any(not r.get("from") and port in [p.get("port") for p in r.get("ports", [])]
                   for r in rules), f"no policy lets clients reach the coordinator on {port}"
    for r in rules:  # what anyone may reach is the gRPC and the HTTP port alone
        if not r.get("from"):
            assert [p.get("port") for p in r.get("ports", [])] == ports, \
                f"clients may reach the coordinator on {r.get('ports', 'every port')}"
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


def exported_session_gauge() -> str:
    """The Prometheus name under which a service exports the sessions it holds now: the gauge of
    specdec/telemetry.py's ``active_sessions`` instrument, read back from a real exposition."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry()
    tel = Telemetry("pearl-target", metric_readers=[PrometheusMetricReader(registry=registry)])
    try:
        tel.metrics.active_sessions.add(3)
        text = generate_latest(registry).decode()
    finally:
        tel.shutdown()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    name = tel.metrics.active_sessions.name
    assert name in fams and fams[name].type == "gauge", f"{name} not a gauge in:\n{text}"
    assert [s.value for s in fams[name].samples] == [3], fams[name].samples
    return name


def quantity(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


@pytest.mark.parametrize("role", ROLES)
def test_gpu_overlay_runs_two_or_more_of_each(role):
    """Two or more pods of each service, so that one can fail or drain while the others serve."""
    n = replica_floor(render("gpu"), role)
    assert n >= 2, f"gpu: {role} may run {n} pod(s)"


@pytest.mark.parametrize("role", ["draft", "target"])
def test_gpu_overlay_scales_draft_and_target_on_their_sessions(role):
    """An autoscaling/v2 HPA per service, on the Deployment of its pods, driven by the pods
    metric the services export (average sessions per pod), not by CPU; the Deployment leaves its
    replica count to the HPA (a replicas field would reset it on every `kubectl apply`)."""
    objs = render("gpu")
    dep = role_deployment(objs, role)
    hpa = autoscaler_of(objs, dep)
    assert hpa is not None, f"no HorizontalPodAutoscaler scales the {role} Deployment"
    assert hpa["apiVersion"] == "autoscaling/v2", hpa["apiVersion"]
    spec = hpa["spec"]
    assert spec.get("minReplicas", 1) >= 2 and spec["maxReplicas"] > spec["minReplicas"], spec
    assert "replicas" not in dep["spec"], \
        f"{role}: spec.replicas {dep['spec']['replicas']} fights the autoscaler on each apply"
    gauge = exported_session_gauge()
    metrics = spec.get("metrics", [])
    assert metrics and all(m["type"] == "Pods" for m in metrics), \
        f"{role}: metrics {[m['type'] for m in metrics]}; a GPU pod's CPU is no measure of load"
    assert any(m["pods"]["metric"]["name"] == gauge and not m["pods"]["metric"].get("selector")
               and m["pods"]["target"]["type"] == "AverageValue"
               and quantity(m["pods"]["target"]["averageValue"]) > 0 for m in metrics), \
        f"{role}: no AverageValue target on the pods metric {gauge}: {metrics}"
    behavior = spec.get("behavior", {}).get("scaleDown", {})
    assert behavior.get("stabilizationWindowSeconds", 300) >= 300, \
        f"{role}: scales down within {behavior.get('stabilizationWindowSeconds')} s of a dip"


def test_the_adapter_rule_serves_the_gauge_the_autoscalers_read():
    """k8s/monitoring's Prometheus adapter rule turns the exported gauge, per pod and namespace,
    into the custom metric every HPA of the gpu overlay names; the example validates."""
    examples = validate.examples()
    objs = [o for objs in examples.values() for o in objs]
    assert not validate.validate_objects(objs), validate.validate_objects(objs)
    gauge = exported_session_gauge()
    wanted = {m["pods"]["metric"]["name"] for h in of_kind(render("gpu"), "HorizontalPodAutoscaler")
              for m in h["spec"]["metrics"]}
    served = set()
    for cm in of_kind(objs, "ConfigMap"):
        for rule in yaml.safe_load(cm["data"]["config.yaml"]).get("rules", []):
            series = re.match(r"\s*([A-Za-z_:][A-Za-z0-9_:]*)\{(.*)\}\s*$", rule["seriesQuery"])
            if not series or series.group(1) != gauge:
                continue
            for label in ("namespace", "pod"):
                assert f'{label}!=""' in series.group(2), f"{rule['seriesQuery']}: no {label}"
            over = rule["resources"]["overrides"]
            assert over["namespace"]["resource"] == "namespace", over
            assert over["pod"]["resource"] in ("pod", "pods"), over
            for part in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
                assert part in rule["metricsQuery"], f"{rule['metricsQuery']} lacks {part}"
            name = rule.get("name", {})
            assert re.search(name.get("matches", ".*"), gauge), name
            served.add(name.get("as") or gauge)
    assert wanted and wanted <= served, f"the HPAs read {wanted}, the adapter serves {served}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_in_the_namespace_it_renders(overlay):
    """Objects an overlay adds (the autoscalers) land in the base's namespace: an HPA elsewhere
    would scale nothing."""
    objs = render(overlay)
    ns = namespace_of(role_deployment(objs, "coordinator"))
    assert ns != "default" and {ns} == {o["metadata"]["name"] for o in of_kind(objs, "Namespace")}
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == ns, f"{validate.name_of(o)} not in {ns}"


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
