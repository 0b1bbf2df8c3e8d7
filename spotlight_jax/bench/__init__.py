"""Benchmark CLI: `python -m spotlight_jax.bench {decode,kernels,generate,train} ...`.

Each subcommand is a module of this package exposing `add_arguments(parser)` and `run(args)`. Benchmarks are
programs, not tests: they write JSON (device, date, jax version) to experiments/results/ and print a table.
"""
