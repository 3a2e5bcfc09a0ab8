#!/usr/bin/env bash
# One bounded call on the GPU machine lent through the device tool: what cnnjax's training
# costs there, as one JSON ($OUT/results.json) and a log ($OUT/log.txt).
#
# Here, once:  python benchmarks/gpu/prepare_data.py --data-dir ../shared/data --out .devdata
# Device call: run(command="bash benchmarks/gpu/run.sh", carry=[".devdata"], timeout_s=600)
# Check here:  SMOKE=1 OUT=/tmp/gpu-smoke bash benchmarks/gpu/run.sh     (CPU, tiny settings)
#
# Parts, in order, each in its own process under its own timeout, so one that overruns
# loses only itself (merge marks it missing):
#   mnist     MNIST recipe, 5 epochs, data on the device, compile apart   goal <= 2 s, >= 0.990
#   catsdogs  experiment 2 at 150 px, seconds per epoch, x100             goal <= 60 s
#   seeds     K=8 seeds against one (experiment 2, 150 px), per step      goal <= 2x
#   grid      an ablation grid in one program against its settings in turn  goal <= 0.9
#   scaling   1 device against all (benchmarks/scaling.py), where the machine has several
# Nothing is installed: PYTHONPATH=$PWD, the GPU image's jax/flax/optax/orbax/numpy/pillow.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CNNJAX_CACHE_DIR=${CNNJAX_CACHE_DIR:-/tmp/cnnjax-cache} MPLBACKEND=Agg
PY=${PYTHON:-python}
OUT=${OUT:-runs/gpu}
DATA=${DATA:-.devdata}
PARTS=${PARTS:-mnist catsdogs seeds grid scaling}
MNIST_S=${MNIST_S:-120}
CATS_S=${CATS_S:-150}
SEEDS_S=${SEEDS_S:-150}
GRID_S=${GRID_S:-240}
SCALING_S=${SCALING_S:-120}
SMOKE=${SMOKE:-}
smoke=()
[[ -n "$SMOKE" ]] && smoke=(--smoke)
mkdir -p "$OUT/parts"
log="$OUT/log.txt"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import sys, jax, flax, optax; print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
  du -sh "$DATA" 2>/dev/null || echo "no $DATA: run benchmarks/gpu/prepare_data.py here and carry it"
} 2>&1 | tee -a "$log"

part() {  # part NAME SECONDS COMMAND...: run under a timeout, log its output and exit code
  local name=$1 seconds=$2
  shift 2
  echo "== $name (at most ${seconds} s)" | tee -a "$log"
  timeout "$seconds" "$@" 2>&1 | tr '\r' '\n' | grep -v '^ *$' >> "$log"
  echo "== $name rc ${PIPESTATUS[0]} (124: out of time)" | tee -a "$log"
}

for p in $PARTS; do
  case $p in
    mnist|catsdogs|seeds|grid)
      limit_var="$(echo "$p" | tr a-z A-Z)_S"; [[ $p == catsdogs ]] && limit_var=CATS_S
      part "$p" "${!limit_var}" "$PY" benchmarks/gpu/bench.py "$p" --data "$DATA" --json "$OUT/parts/$p.json" "${smoke[@]}" ;;
    scaling)
      count=$("$PY" -c "import jax; print(jax.device_count())" 2>/dev/null || echo 1)
      if [[ -n "$SMOKE" ]]; then devices=1,2; steps=4; size=(--image-size 48)  # forced CPU devices: the code path only
      elif (( count > 1 )); then devices="1,$count"; steps=40; size=()
      else echo "== scaling skipped: 1 device" | tee -a "$log"; continue; fi
      part scaling_mnist "$SCALING_S" "$PY" benchmarks/scaling.py --devices "$devices" --recipe mnist --steps "$steps" \
        --json "$OUT/parts/scaling_mnist.json"
      part scaling_catsdogs "$SCALING_S" "$PY" benchmarks/scaling.py --devices "$devices" --recipe catsdogs2 "${size[@]}" \
        --steps "$steps" --json "$OUT/parts/scaling_catsdogs.json" ;;
    *) echo "unknown part $p" | tee -a "$log" ;;
  esac
done

"$PY" benchmarks/gpu/bench.py merge --parts "$OUT/parts" --json "$OUT/results.json" 2>&1 | tee -a "$log"
echo "wrote $OUT/results.json" | tee -a "$log"
