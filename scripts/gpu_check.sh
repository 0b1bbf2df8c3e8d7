#!/usr/bin/env bash
# Compiled kernel tests, one file per process (a compiler crash in one file does not hide the others), with every
# test's name in the log; then the dense decode step (step time, compile time, XLA temp memory).
set -uo pipefail
cd "$(dirname "$0")/.."
export SPOTLIGHT_PALLAS_INTERPRET=0 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
dest="${OUT:-experiments/results}"; mkdir -p "$dest"
for f in tests/test_pack_bits.py tests/test_hamming_topk.py tests/test_sparse_decode_attention.py \
  tests/test_spotlight_attention.py tests/test_decode_attention.py tests/test_decode_prologue.py; do
  timeout "${T_TEST:-150}" python -m pytest -v -p no:cacheprovider "$f" 2>&1 \
    | grep --line-buffered -E "::|passed|failed|Fatal|Error" | grep -v "^  File" >> "$dest/tests_compiled.log"
  echo "== $f rc=${PIPESTATUS[0]}" | tee -a "$dest/tests_compiled.log"
done
[ "${SKIP_DECODE:-0}" = 1 ] && exit 0
q() { grep --line-buffered -v -i -E "warn|slow_operation|rematerial|exceeds the base limit"; }
timeout 200 python -m spotlight_jax.bench decode --batch 1 8 20 --context 32768 --steps 16 --repeats 3 \
  --name decode_check --out-dir "$dest" 2>&1 | q | grep -E "compiled|step_us" | tee -a "$dest/decode_check.log"
