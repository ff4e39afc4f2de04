#!/usr/bin/env bash
# Podman for nested sandboxes (this project's CI machines): what `make image` and
# `make deploy-local` need, installed from Debian's packages, plus two workarounds. A normal
# machine with podman (or Docker and a Kubernetes cluster) needs none of this; see k8s/README.md.
#
#   1. The sandbox may not set resource limits (no CAP_SYS_RESOURCE): runc and crun fail with
#      "setrlimit RLIMIT_NOFILE: Operation not permitted" even when the limits asked for are the
#      current ones. A wrapper runtime (pearl-runc) deletes process.rlimits from the OCI bundle's
#      config.json (and from `runc exec`'s process.json) and then execs runc.
#   2. The cgroups are v1 with a v2 hierarchy beside them ("hybrid"): crun refuses them; runc with
#      podman's cgroupfs manager (no systemd here) works.
#
# Also: netavark + aardvark-dns, so that pods on one network find each other by name (the bridge
# for Kubernetes Services in scripts/deploy_local.py), and the "file" events logger (no journald).
# Idempotent; run as root. Usage: scripts/podman-setup.sh [--check]  (--check: report, change nothing)
set -euo pipefail

PACKAGES=(podman buildah runc uidmap mmdebstrap netavark aardvark-dns fuse-overlayfs)
WRAPPER=/usr/local/libexec/pearl-runc
CONF=/etc/containers/containers.conf
MARK="# written by pearl scripts/podman-setup.sh"

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "${1:-}" = "--check" ]; then
    [ ${#missing[@]} -eq 0 ] && [ -x "$WRAPPER" ] && grep -qF "$MARK" "$CONF" 2>/dev/null
    exit $?
fi

if [ "$(id -u)" != 0 ]; then
    echo "podman-setup: run as root (it installs packages and writes $CONF)" >&2
    exit 1
fi

if [ ${#missing[@]} -gt 0 ]; then
    echo "podman-setup: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p "$(dirname "$WRAPPER")"
cat >"$WRAPPER.tmp" <<'EOF'
#!/bin/sh
# pearl-runc: runc without process.rlimits (scripts/podman-setup.sh says why).
strip() {
    [ -f "$1" ] || return 0
    python3 - "$1" <<'PY'
import json, sys
path = sys.argv[1]
with open(path) as f:
    spec = json.load(f)
proc = spec.get("process", spec)  # config.json has it under "process"; exec's process.json is one
if proc.pop("rlimits", None) is not None:
    with open(path, "w") as f:
        json.dump(spec, f)
PY
}
prev=""
cmd=""
for a in "$@"; do
    case "$prev" in
        --bundle|-b) strip "$a/config.json" ;;
        --process|-p) [ "$cmd" = exec ] && strip "$a" ;;
    esac
    case "$a" in
        --bundle=*) strip "${a#--bundle=}/config.json" ;;
        --process=*) strip "${a#--process=}" ;;
        create|run|exec) [ -z "$cmd" ] && cmd=$a ;;
    esac
    prev=$a
done
exec /usr/sbin/runc "$@"
EOF
chmod 755 "$WRAPPER.tmp"
mv "$WRAPPER.tmp" "$WRAPPER"

if ! grep -qF "$MARK" "$CONF" 2>/dev/null; then
    [ -f "$CONF" ] && cp "$CONF" "$CONF.pearl-backup"
    cat >"$CONF" <<EOF
$MARK
[containers]
# the sandbox forbids setting limits; leave the container's as the host's
default_ulimits = []

[network]
network_backend = "netavark"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "pearl-runc"

[engine.runtimes]
pearl-runc = ["$WRAPPER"]
EOF
fi
echo "podman-setup: podman $(podman version --format '{{.Client.Version}}') with runtime pearl-runc, cgroupfs, netavark"
