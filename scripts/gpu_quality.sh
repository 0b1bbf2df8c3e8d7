#!/usr/bin/env bash
# Decode-path quality evaluations (issue 5) on the GPU, through the compiled kernels: perplexity, passkey, fidelity.
#   MODEL=<load_model source> HASHES=<hash export> TOKENS=<folder with perplexity.npz passkey.npz fidelity.npz> \
#     scripts/gpu_quality.sh
# Token files come from `python -m spotlight_jax.eval <name> --save-tokens ...` on a machine that has the corpus and
# the tokenizer (the GPU machine has neither `datasets` nor the corpus). Results go to $OUT/quality (or
# experiments/results/quality) as JSON, markdown and PNG, with a log per evaluation.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
dest="${OUT:-experiments/results}/quality"
mkdir -p "$dest"
common=(--hashes "${HASHES:?set HASHES to a hash export}" --out-dir "$dest")
[ -n "${MODEL:-}" ] && common+=(--model "$MODEL")
quiet() { grep --line-buffered -v -i -E "warn|slow_operation|\*\*\*\*|very slow compile"; }
rc=0
for ev in ${EVALS:-perplexity passkey fidelity}; do
  extra=()
  case $ev in
    perplexity) extra=(--batch "${PPL_BATCH:-8}") ;;
    passkey) extra=(--batch "${PASSKEY_BATCH:-5}") ;;
    fidelity) extra=(--batch "${FIDELITY_BATCH:-25}") ;;
  esac
  timeout "${T_EVAL:-240}" python3 -m spotlight_jax.eval "$ev" "${common[@]}" --tokens "${TOKENS:?}/$ev.npz" \
    --methods ${METHODS:-dense oracle linear-128 linear-1024 spotlight} "${extra[@]}" 2>&1 | quiet | tee "$dest/$ev.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
done
exit $rc
