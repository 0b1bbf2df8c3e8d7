#!/usr/bin/env bash
# Tensor-parallel decode on a multi-GPU machine (e.g. the device tool's nvidia-h200-x2):
#   TP=2 scripts/gpu_tp.sh            dense vs spotlight at 128K, batch 1 and the largest dense batch, per-kernel profile
#   TP=2 BATCH="24 28" scripts/gpu_tp.sh   explicit batches (METHODS, CONTEXT, STEPS, MEM_FRACTION likewise;
#   e.g. METHODS="dense spotlight spotlight+noprologue" to time the unfused decode prologue beside the default)
# Results land in $OUT (device tool) or experiments/results/ as generate_tp<N>.{json,md} plus the log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}" XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.94}
dest="${OUT:-experiments/results}"
mkdir -p "$dest"
tp="${TP:-2}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m spotlight_jax.bench generate --tp "$tp" --context ${CONTEXT:-131072} ${BATCH:+--batch $BATCH} --methods ${METHODS:-dense spotlight} \
  --steps ${STEPS:-32} --repeats 3 --profile --name "generate_tp$tp" --out-dir "$dest" 2>&1 | grep --line-buffered -v -i -E "warn|slow_op" \
  | tee "$dest/generate_tp$tp.log"
rc=${PIPESTATUS[0]}
exit $rc
