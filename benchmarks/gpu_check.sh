#!/usr/bin/env bash
# Every GPU figure of issue 18 in one run: about 6-8 minutes on an H100 / H200.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]        (default: $OUT, else benchmarks/gpu-<date>)
#
# Writes 7 files under OUTDIR and exits non-zero as soon as a step fails:
#   inference-513.json        bench --mode inference, 513, batch 1, every default case (9): eager, CUDA graphs, and
#                             torch.compile + CUDA graphs ({1} and {1, 0.75, 0.5} attention); the records
#                             carry "graph" and "compile"
#   train-321.json            bench --mode train, crop 321, batch 30, every default case (the engine's step)
#   loader-321.json           bench --mode data + --mode train-e2e (real loader, workers auto, batch 30)
#   profile-train-321.json    torch.profiler of the 3-scale attention step: device ms/step, conv share,
#                             top kernels and ops (+ profile-train-321.trace.json.gz for Perfetto)
#   checks.json               env; uint8 normalisation on the device bit-identical; CUDA-graph inference
#                             = eager; evaluate-path images/s at batch 1 and 8 (benchmarks/gpu_checks.py)
#   gpu_check.log             everything printed
#
# Needs PyTorch with CUDA and msattn's dependencies (typer, rich, pillow, numpy, filelock); msattn
# itself is used from this checkout. DEVICE, WIDTH, INF_SIZE, TRAIN_SIZE, BATCH, ITERS and WARMUP
# override the settings, SKIP_COMPILE=1 leaves out torch.compile (tests run it on CPU, tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-benchmarks/gpu-$(date +%Y%m%d)}}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
WIDTH=${WIDTH:-1}
INF_SIZE=${INF_SIZE:-513}
TRAIN_SIZE=${TRAIN_SIZE:-321}
BATCH=${BATCH:-30}
ITERS=${ITERS:-50}
WARMUP=${WARMUP:-10}
AMP=--amp
[ "$DEVICE" = cpu ] && AMP=--no-amp
LOG="$OUTDIR/gpu_check.log"
: > "$LOG"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

step() {  # step NAME COMMAND...: run, log, time; stop the script when it fails
  local name=$1 start=$SECONDS
  shift
  echo "== $name: $*" | tee -a "$LOG"
  if ! "$@" 2>&1 | tee -a "$LOG"; then
    echo "== $name FAILED" | tee -a "$LOG"
    exit 1
  fi
  echo "== $name: $((SECONDS - start)) s" | tee -a "$LOG"
}

bench() { "$PY" -m msattn.cli bench --device "$DEVICE" "$AMP" --channels-last --width "$WIDTH" "$@"; }

$PY -c "import torch; assert torch.device('$DEVICE').type == 'cpu' or torch.cuda.is_available(), 'no CUDA GPU'"
nvidia-smi >> "$LOG" 2>&1 || true

# inference 513, batch 1: eager (the "before"), CUDA graphs, torch.compile inside the graph
step inference-eager bench --size "$INF_SIZE" --mode inference --no-graph --iters "$ITERS" --warmup "$WARMUP" \
  --json "$TMP/inference-eager.json"
step inference-graph bench --size "$INF_SIZE" --mode inference --graph --iters "$ITERS" --warmup "$WARMUP" \
  --json "$TMP/inference-graph.json"
if [ "${SKIP_COMPILE:-0}" != 1 ]; then  # inductor compiles each case once (about a minute each, cached after)
  step inference-compile-graph bench --size "$INF_SIZE" --mode inference --graph --compile --iters "$ITERS" \
    --warmup "$WARMUP" --case 1 --case 1,0.75,0.5:attention --json "$TMP/inference-compile-graph.json"
fi
$PY - "$OUTDIR/inference-$INF_SIZE.json" "$TMP"/inference-*.json <<'EOF'
import json, sys
records = [r for path in sys.argv[2:] for r in json.load(open(path))]
json.dump(records, open(sys.argv[1], "w"), indent=2)
EOF

# training step, crop 321, batch 30: every case (the issue's table: {1} and {1, 0.75, 0.5} attention)
step train bench --size "$TRAIN_SIZE" --batch "$BATCH" --mode train --iters "$((ITERS / 2 > 1 ? ITERS / 2 : 1))" \
  --warmup "$((WARMUP / 2))" --json "$OUTDIR/train-$TRAIN_SIZE.json"

# the loader: one worker's decode + augment rate, then the real loader (workers auto) + the step
step loader bench --size "$TRAIN_SIZE" --batch "$BATCH" --mode data --mode train-e2e --workers auto \
  --iters "$((ITERS / 2 > 1 ? ITERS / 2 : 1))" --warmup "$((WARMUP / 2))" --json "$OUTDIR/loader-$TRAIN_SIZE.json"

# where the training step's time goes
step profile "$PY" benchmarks/profile_train_step.py --out "$OUTDIR" --device "$DEVICE" --size "$TRAIN_SIZE" \
  --batch "$BATCH" --width "$WIDTH" --steps 3 --warmup "$((WARMUP / 2 > 1 ? WARMUP / 2 : 1))"

# CUDA-graph inference against eager, uint8 normalisation, evaluate-path images/s
step checks "$PY" benchmarks/gpu_checks.py --out "$OUTDIR" --device "$DEVICE" --width "$WIDTH" \
  --iters "$((ITERS / 2 > 1 ? ITERS / 2 : 1))" --pad-to "$INF_SIZE"

echo "== done: $(ls "$OUTDIR" | tr '\n' ' ')" | tee -a "$LOG"
