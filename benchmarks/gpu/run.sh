#!/usr/bin/env bash
# One prepared run on the GPU machine lent through the device tool, sized to its budget
# (15 device minutes a session, a minute or two of them to start the machine).
#
# Here, once:    python benchmarks/gpu/prepare_data.py --data-dir ../shared/data --out .devdata
# Device call:   run(command="bash benchmarks/gpu/run.sh", carry=[".devdata"], timeout_s=420)
# Call again at once (the machine stays warm ~30 s) to go on with the ablation where it stopped:
#                run(command="STEPS=ablation ABLATION_S=380 bash benchmarks/gpu/run.sh", carry=[".devdata"], timeout_s=420)
#
# STEPS (default "bench ablation tests"), in order of priority, each bounded by a timeout
# so the next one still runs and $OUT comes back:
#   bench     benchmarks/ablation_vmap.py at 150 px: K=8 seeds vmapped vs one (goal <= 2x).
#   ablation  the default grid at 150 px, SEEDS seeds, EPOCHS epochs, for ABLATION_S
#             seconds. Its folder is /tmp/ablation-gpu, so a second call on the warm
#             machine skips the finished settings and resumes the interrupted one.
#   tests     tests/test_train.py and tests/test_ops.py on the GPU (vmapped = sequential
#             seeds, scan = loop, the convolution and pool gradients), for TESTS_S seconds.
# $OUT gets log.txt, ablation.tgz (results.md/csv, curves.png, every result.json; no
# checkpoints) and pytest.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CNNJAX_CACHE_DIR=/tmp/cnnjax-cache
OUT=${OUT:-runs/gpu}
DATA=${DATA:-.devdata}
STEPS=${STEPS:-bench ablation tests}
SEEDS=${SEEDS:-3}
EPOCHS=${EPOCHS:-30}
BENCH_S=${BENCH_S:-90}
ABLATION_S=${ABLATION_S:-200}
TESTS_S=${TESTS_S:-60}
ABLATION_DIR=/tmp/ablation-gpu
mkdir -p "$OUT"
log="$OUT/log.txt"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee -a "$log"

if [[ " $STEPS " == *" bench "* ]]; then
  timeout "$BENCH_S" python benchmarks/ablation_vmap.py --data-dir "$DATA" --seeds 8 --image-size 150 --steps 50 2>&1 | tee -a "$log"
  echo "bench rc $?" | tee -a "$log"
fi

if [[ " $STEPS " == *" ablation "* ]]; then
  # SIGINT stops the runner like a Ctrl-C: finished settings keep their result.json.
  timeout --signal=INT "$ABLATION_S" python experiments/ablate_augmentation.py --data-dir "$DATA" \
    --seeds "$SEEDS" --epochs "$EPOCHS" --out "$ABLATION_DIR" 2>&1 | tr '\r' '\n' | grep -v '^ *$' >> "$log"
  echo "ablation rc ${PIPESTATUS[0]}" | tee -a "$log"
  python experiments/ablate_augmentation.py --table-only --out "$ABLATION_DIR" 2>&1 | tee -a "$log"
  tar czf "$OUT/ablation.tgz" --exclude=best --exclude=latest -C /tmp ablation-gpu
fi

if [[ " $STEPS " == *" tests "* ]]; then
  timeout "$TESTS_S" python -m pytest -q -p no:cacheprovider tests/test_train.py tests/test_ops.py > "$OUT/pytest.txt" 2>&1
  echo "tests rc $? (124: out of time)" | tee -a "$log"
fi
