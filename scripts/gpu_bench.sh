#!/usr/bin/env bash
# Run benchmarks on the GPU machine and copy the result files to $OUT (device tool) or ./gpu_out.
# Usage: bash scripts/gpu_bench.sh decode [generate] [train] ...   (each a `python -m spotlight_jax.bench` subcommand)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}" XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader || true
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
status=0
for cmd in "$@"; do
  echo "=== bench $cmd"
  case "$cmd" in
    decode)   python3 -m spotlight_jax.bench decode --batch 1 8 --context 4096 32768 --out-dir "$OUT" ;;
    generate) python3 -m spotlight_jax.bench generate --out-dir "$OUT" ;;
    train)    python3 -m spotlight_jax.bench train --out-dir "$OUT" ;;
    *)        python3 -m spotlight_jax.bench $cmd --out-dir "$OUT" ;;
  esac || status=1
done
exit $status
