"""`python -m spotlight_jax.eval SUBCOMMAND ...`: quality evaluations, one module per subcommand.

Every module `spotlight_jax/eval/<name>.py` that defines `add_arguments(parser)` and `run(args)` is a subcommand
(helper modules without them are skipped); it is imported only when chosen. Its `--help` line is its docstring's
first line unless `DESCRIPTIONS` has one.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import pkgutil
import sys

DESCRIPTIONS = {
    "recall": "recall@k / IoU of selected tokens vs the oracle top-k of group-aggregated attention, per layer",
    "perplexity": "perplexity of dense vs sparse decoding",
    "passkey": "passkey / needle retrieval accuracy at long context",
    "fidelity": "output fidelity of sparse vs dense decoding",
}


def _inspect(name: str) -> tuple[bool, str]:
    """(is a subcommand: defines add_arguments and run, first docstring line), read without importing the module."""
    try:
        with open(os.path.join(__path__[0], f"{name}.py")) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return False, ""
    funcs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    doc = (ast.get_docstring(tree) or "").strip()
    return {"add_arguments", "run"} <= funcs, (doc.splitlines()[0] if doc else f"spotlight_jax.eval.{name}")


def subcommands() -> dict[str, str]:
    """name -> description for every module of this package that defines `add_arguments` and `run`."""
    out = {}
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if m.name.startswith("_"):
            continue
        ok, doc = _inspect(m.name)
        if ok:
            out[m.name] = DESCRIPTIONS.get(m.name) or doc
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m spotlight_jax.eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in subcommands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:  # import only the chosen evaluation (each pulls in its own heavy modules)
            importlib.import_module(f"spotlight_jax.eval.{name}").add_arguments(p)
    args = parser.parse_args(argv)
    result = importlib.import_module(f"spotlight_jax.eval.{args.command}").run(args)
    return result if isinstance(result, int) else 0
