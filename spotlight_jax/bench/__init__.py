"""Benchmarks: programs, not tests. Each prints a table and writes JSON (device, date, jax version) + markdown into a
new run folder, runs/bench/<command>-<UTC time>/, or into --out-dir (file stem: --name). Most need a GPU.

examples:
  python -m spotlight_jax.bench generate --context 131072 --methods dense spotlight --profile
  python -m spotlight_jax.bench decode --model llama3-8b --batch 1 8 --context 4096 32768
  python -m spotlight_jax.bench kernels --model qwen2.5-7b --batch 1 --no-xla --out-dir runs/bench/kernels-qwen
  python -m spotlight_jax.bench attention --impls xla pallas --interpret --context 256 --chunk 64 --heads 4:2:32
  python -m spotlight_jax.bench train --mode step --model qwen2.5-7b
  python -m spotlight_jax.bench e2e --help

Model shapes (--model): qwen2.5-7b, llama3-8b, smollm2-135m (the names of configs/*.json; 'llama-3-8b' works too).
From a notebook: `generate.run(generate.GenerateBenchConfig(...))`.
"""

from __future__ import annotations

from collections.abc import Sequence

SUBCOMMANDS = {
    "decode": "dense decode step of a real-shape model with random weights vs its HBM roofline",
    "kernels": "pack_bits / hamming_topk / sparse_decode_attention vs XLA references and dense decode attention",
    "generate": "decode-only microbenchmark on a synthetic cache: decode tokens/s, dense vs spotlight",
    "e2e": "prompt -> tokens through generate(): time to first token, decode tokens/s, peak memory",
    "attention": "prefill flash attention: ours (Pallas) vs cuDNN vs XLA blocked, TFLOP/s",
    "train": "hash-training steps/s (7B shape) and whole-model training wall time (SmolLM2)",
}


def main(argv: Sequence[str] | None = None) -> int:
    from spotlight_jax.cli import dispatch

    return dispatch(argv, prog="spotlight-bench", description=__doc__, package=__name__, subcommands=SUBCOMMANDS)
