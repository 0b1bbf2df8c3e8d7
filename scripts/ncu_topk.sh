#!/usr/bin/env bash
# Nsight Compute on the Hamming top-k passes (stall reasons, DRAM throughput, occupancy), one shape per line of
# SHAPES ("B:K:N:S", default: Qwen b1 512K, Qwen b8 128K, the TP=2 decode step's 27 x 2 KV heads at 128K).
#   bash scripts/ncu_topk.sh            -> $OUT/ncu_topk.txt (or experiments/results/)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
dest="${OUT:-experiments/results}"; mkdir -p "$dest"
for shape in ${SHAPES:-1:4:28:524288 8:4:28:131072 27:2:14:131072}; do
  echo "=== shape B:K:N:S = $shape" | tee -a "$dest/ncu_topk.txt"
  timeout "${T_NCU:-150}" ncu --kernel-name regex:"hamming_" --launch-skip 3 --launch-count 3 \
    --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
    --section MemoryWorkloadAnalysis python - "$shape" <<'PY' 2>&1 | grep -v -E "^==PROF==|WARNING" >> "$dest/ncu_topk.txt"
import sys
import jax, jax.numpy as jnp
from pallas_kernels.hamming_topk import hamming_topk
b, kv, n, s = map(int, sys.argv[1].split(":"))
key = jax.random.key(0)
q = jax.random.bits(key, (b, n, 4), jnp.uint32)
kc = jax.random.bits(jax.random.key(1), (b, kv, s, 4), jnp.uint32)
lengths = jnp.full((b,), s, jnp.int32)
k = int(0.02 * s)
f = jax.jit(lambda q, kc, l: hamming_topk(q, kc, l, k, implementation="pallas").indices)
for _ in range(3):
    jax.block_until_ready(f(q, kc, lengths))
PY
  echo "rc=${PIPESTATUS[0]}" | tee -a "$dest/ncu_topk.txt"
done
