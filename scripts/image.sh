#!/usr/bin/env bash
# `make image`: the project's OCI image built on a machine that reaches only the package registries
# (Debian's, PyPI), with podman and the Dockerfile:
#   1. the base: Debian bookworm's own python3.11 from Debian's packages (mmdebstrap), imported as
#      localhost/pearl-base:bookworm-HASH; HASH covers the recipe, so it is made once;
#   2. a wheelhouse on the host (build/wheelhouse): `pip wheel` of torch and every dependency, with
#      the host's pip settings (the local torch file, the index, its certificates), which a build
#      container does not have; remade only when pyproject.toml's dependencies change;
#   3. `podman build` of the Dockerfile on that base, pip offline from the wheelhouse (mounted
#      read-only at /wheels); podman's layer cache keeps what did not change.
# DEVICE=cuda builds the GPU image instead: torch's default (CUDA) wheel from the index, no
# wheelhouse; it needs a build container that reaches PyPI, so not on this project's CI machines.
# Usage: scripts/image.sh   (env: IMAGE, DEVICE=cpu|cuda, PY=the venv's python)
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cpu}
IMAGE=${IMAGE:-pearl:dev}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,ca-certificates
MIRRORS=("deb http://deb.debian.org/debian $SUITE main"
         "deb http://deb.debian.org/debian $SUITE-updates main"
         "deb http://deb.debian.org/debian-security $SUITE-security main")
WHEELHOUSE=build/wheelhouse
t0=$(date +%s)

bash scripts/podman-setup.sh --check || bash scripts/podman-setup.sh

# 1. The base image
recipe="$SUITE $BASE_PACKAGES ${MIRRORS[*]} minbase nodoc v1"
BASE=localhost/pearl-base:$SUITE-$(printf '%s' "$recipe" | sha256sum | cut -c1-12)
if ! podman image exists "$BASE"; then
    echo "image: making $BASE with mmdebstrap (Debian's packages)"
    mkdir -p build
    rm -f build/base.tar
    mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
        "$SUITE" build/base.tar "${MIRRORS[@]}"
    podman import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
        build/base.tar "$BASE" >/dev/null
    rm -f build/base.tar
fi

build_args=(--build-arg "BASE_IMAGE=$BASE")
volumes=()
if [ "$DEVICE" = cpu ]; then
    # 2. The wheelhouse: torch (CPU build, from the host's disk), what the project needs, and
    # setuptools for building the project's own wheel inside the build.
    deps=$("$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
    want=$(printf '%s\nsetuptools>=68\nwheel\n' "$deps" | sha256sum | cut -c1-16)
    if [ "$(cat "$WHEELHOUSE/.stamp" 2>/dev/null)" != "$want" ]; then
        echo "image: wheelhouse ($WHEELHOUSE) from the host's pip"
        rm -rf "$WHEELHOUSE"
        mkdir -p "$WHEELHOUSE"
        printf '%s\nsetuptools>=68\nwheel\n' "$deps" >"$WHEELHOUSE/requirements.txt"
        "$PY" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$WHEELHOUSE" \
            -r "$WHEELHOUSE/requirements.txt" 2> >(grep -v "^WARNING: Location" >&2)
        echo "$want" >"$WHEELHOUSE/.stamp"
    fi
    build_args+=(--build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels)
    volumes=(-v "$PWD/$WHEELHOUSE:/wheels:ro")
elif [ "$DEVICE" = cuda ]; then
    [ "$IMAGE" = pearl:dev ] && IMAGE=pearl:dev-cuda
else
    echo "image: DEVICE must be cpu or cuda, not $DEVICE" >&2
    exit 2
fi

# 3. The image
echo "image: podman build -t $IMAGE ($DEVICE)"
mkdir -p build
if ! podman build --pull=never --layers --label io.pearl.image=1 "${build_args[@]}" "${volumes[@]}" -t "$IMAGE" \
        -f Dockerfile . >build/image.log 2>&1; then
    tail -40 build/image.log >&2
    echo "image: podman build failed (whole log: build/image.log)" >&2
    exit 1
fi
grep -E 'STEP [0-9]+/[0-9]+: (FROM|RUN|COPY)|Using cache' build/image.log | sed 's/^/  /' || true
podman image prune -f --filter label=io.pearl.image >/dev/null  # what a rebuild replaced
size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
echo "image: $IMAGE $((size / 1000000)) MB, built in $(( $(date +%s) - t0 )) s"
