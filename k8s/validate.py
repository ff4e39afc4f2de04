#!/usr/bin/env python3
"""Render every kustomize overlay and validate each object against the Kubernetes JSON schemas.

Offline: `kubectl kustomize` needs no cluster, and kubernetes-validate ships its schemas inside the
package. Both come from `make k8s-tools` (scripts/install-k8s-tools.sh). Schemas are strict (an
unknown field is an error), and each object is checked against the oldest Kubernetes these
manifests support (1.27: gRPC probes are GA there) and the newest the validator knows.

    python k8s/validate.py                 # every overlay under k8s/overlays, and the examples
    python k8s/validate.py gpu -v 1.30.0   # one overlay, one Kubernetes version

The examples are plain manifests outside the overlays (k8s/monitoring: the Prometheus adapter's
rule for the autoscalers' metric); they are validated as they are.

kubectl is $KUBECTL, else the one installed beside this Python (the project's .venv), else the
first on PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

K8S_DIR = Path(__file__).resolve().parent
OVERLAYS_DIR = K8S_DIR / "overlays"
EXAMPLES_DIR = K8S_DIR / "monitoring"
VERSIONS = ("1.27.0", "1.37.0")


class ToolMissing(RuntimeError):
    """kubectl or kubernetes-validate is not installed."""


def find_kubectl() -> str:
    if os.environ.get("KUBECTL"):
        path = shutil.which(os.environ["KUBECTL"])
        if not path:
            raise ToolMissing(f"KUBECTL={os.environ['KUBECTL']} is not an executable")
        return path
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("kubectl")
    if found:
        return found
    raise ToolMissing(
        "kubectl not found ($KUBECTL, beside the Python, or on PATH); install it with "
        "`make k8s-tools` (scripts/install-k8s-tools.sh)")


def overlays() -> list[str]:
    return sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())


def render(overlay: str, kubectl: str | None = None) -> list[dict]:
    """`kubectl kustomize k8s/overlays/OVERLAY`, parsed into a list of objects."""
    import yaml

    path = OVERLAYS_DIR / overlay
    if not (path / "kustomization.yaml").is_file():
        raise FileNotFoundError(f"no overlay {overlay!r} ({path}/kustomization.yaml)")
    proc = subprocess.run([kubectl or find_kubectl(), "kustomize", str(path)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed:\n{proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def examples() -> dict[str, list[dict]]:
    """The example manifests (file name -> its objects)."""
    import yaml

    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(EXAMPLES_DIR.glob("*.yaml"))}


def name_of(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def validate_objects(objs: list[dict], versions: tuple[str, ...] = VERSIONS) -> list[str]:
    """Every problem found, as readable lines; empty when all objects validate."""
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import SchemaNotFoundError, ValidationError
    except ImportError as e:
        raise ToolMissing("kubernetes-validate is not installed; run `make k8s-tools` "
                          "(scripts/install-k8s-tools.sh)") from e
    errors = []
    if not objs:
        errors.append("the overlay rendered no objects")
    for obj in objs:
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                errors.append(f"{name_of(obj)} (Kubernetes {version}): {path}: {e.message}")
            except SchemaNotFoundError:
                errors.append(f"{name_of(obj)}: no schema for {obj.get('apiVersion')} "
                              f"{obj.get('kind')} in Kubernetes {version}")
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overlays", nargs="*",
                   help="overlay names (default: all under k8s/overlays, and the examples)")
    p.add_argument("-v", "--version", action="append", dest="versions",
                   help=f"Kubernetes version to validate against (default: {', '.join(VERSIONS)})")
    a = p.parse_args(argv)
    versions = tuple(a.versions or VERSIONS)
    try:
        kubectl = find_kubectl()
        failed = 0
        for overlay in a.overlays or overlays():
            try:
                objs = render(overlay, kubectl)
            except (RuntimeError, FileNotFoundError) as e:
                print(f"FAIL {overlay}: {e}")
                failed += 1
                continue
            errors = validate_objects(objs, versions)
            if errors:
                failed += 1
                print(f"FAIL {overlay}: {len(errors)} problem(s)")
                for line in errors:
                    print(f"  {line}")
            else:
                kinds = sorted({o["kind"] for o in objs})
                print(f"ok   {overlay}: {len(objs)} objects ({', '.join(kinds)}) valid for "
                      f"Kubernetes {', '.join(versions)}")
        for name, objs in ({} if a.overlays else examples()).items():
            errors = validate_objects(objs, versions)
            failed += bool(errors)
            print(f"{'FAIL' if errors else 'ok  '} monitoring/{name}")
            for line in errors:
                print(f"  {line}")
    except ToolMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
