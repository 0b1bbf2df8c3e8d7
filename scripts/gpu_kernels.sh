#!/usr/bin/env bash
# Kernel tests compiled on the GPU (no interpret mode), then the kernel benchmark.
#   scripts/gpu_kernels.sh [benchmark args...]      e.g. --model qwen2.5-7b --batch 1
# Logs and the JSON land in $OUT (device tool) or experiments/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
export SPOTLIGHT_PALLAS_INTERPRET=0 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
dest="${OUT:-experiments/results}"
mkdir -p "$dest"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python -c "import jax; print('jax', jax.__version__, jax.devices())"
rc=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python -m pytest -q -p no:cacheprovider tests/test_pack_bits.py tests/test_hamming_topk.py \
    tests/test_sparse_decode_attention.py tests/test_spotlight_attention.py tests/test_decode_attention.py \
    tests/test_decode_prologue.py 2>&1 | tee "$dest/kernels_tests_gpu.log"
  rc=${PIPESTATUS[0]}
fi
stem="kernels_$(date -u +%Y%m%d_%H%M%S)"; json="$dest/$stem.json"
python -m spotlight_jax.bench kernels --out-dir "$dest" --name "$stem" "$@" 2>&1 | tee "$dest/kernels_bench.log"
[ "$dest" != experiments/results ] && cp "$json" experiments/results/ 2>/dev/null
exit $rc
