#!/usr/bin/env bash
# Everything the GPU checks in one call (the device is leased by the minute): compiled kernel tests + kernel bench,
# dense decode bench, dense-vs-spotlight generate bench, hash-training bench. Logs and JSON go to $OUT (or gpu_out/).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}" XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
quiet() { grep -v -i -E "warn|slow_operation|\*\*\*\*|very slow compile|bfc_allocator|fragmentation|allocation summary"; }
timeout "${T_KERNELS:-200}" bash scripts/gpu_kernels.sh --model qwen2.5-7b --batch 1 8 --context 131072 524288 \
  --repeats 5 2>&1 | quiet > "$OUT/kernels.log"; tail -25 "$OUT/kernels.log"
timeout "${T_DECODE:-100}" python3 -m spotlight_jax.bench decode --batch 1 8 --context 4096 32768 --steps 16 \
  --repeats 3 --out-dir "$OUT" 2>&1 | quiet | tee "$OUT/decode.log" | tail -8
TF_GPU_ALLOCATOR=cuda_malloc_async timeout "${T_GENERATE:-150}" python3 -m spotlight_jax.bench generate \
  --context 131072 --steps 8 --repeats 3 --out-dir "$OUT" 2>&1 | quiet | tee "$OUT/generate.log" | tail -8
timeout "${T_TRAIN:-90}" python3 -m spotlight_jax.bench train --steps 20 --repeats 3 --out-dir "$OUT" --name train_step \
  2>&1 | quiet | tee "$OUT/train.log" | tail -6
# The device returns at most 8 files: pack them into one archive.
(cd "$OUT" && tar czf /tmp/gpu_all.tgz ./* && rm -rf ./* && mv /tmp/gpu_all.tgz .)
