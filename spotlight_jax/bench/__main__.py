"""Dispatch `python -m spotlight_jax.bench SUBCOMMAND ...` to the module spotlight_jax.bench.<subcommand>."""

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "decode": "dense decode step of a real-shape model with random weights vs its HBM roofline",
    "kernels": "pack_bits / hamming_topk / sparse_decode_attention vs XLA references and dense decode attention",
    "generate": "decode-only microbenchmark on a synthetic cache: decode tokens/s, dense vs spotlight",
    "e2e": "prompt -> tokens through generate(): time to first token, decode tokens/s, peak memory",
    "attention": "prefill flash attention: ours (Pallas) vs cuDNN vs XLA blocked, TFLOP/s",
    "train": "hash-training steps/s (7B shape) and whole-model training wall time (SmolLM2)",
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m spotlight_jax.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:  # import only the chosen benchmark (each pulls in its own heavy modules)
            importlib.import_module(f"spotlight_jax.bench.{name}").add_arguments(p)
    args = parser.parse_args(argv)
    importlib.import_module(f"spotlight_jax.bench.{args.command}").run(args)


if __name__ == "__main__":
    main()
