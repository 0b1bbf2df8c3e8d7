"""Quality evaluations on held-out text, one module per subcommand.

Each writes JSON + markdown (+ PNG plots) into a new run folder, runs/eval/<command>-<UTC time>/, or into --out-dir.

examples:
  python -m spotlight_jax.eval recall --hashes spotlight=runs/hash-smollm2-135m/hashes
  python -m spotlight_jax.eval perplexity --hashes runs/hash-smollm2-135m/hashes --methods dense oracle spotlight
  python -m spotlight_jax.eval passkey --hashes H --lengths 2048 4096 --methods dense spotlight+sink4
  python -m spotlight_jax.eval fidelity --hashes H --num-prompts 10 --out-dir runs/eval/fidelity-small
  python -m spotlight_jax.eval perplexity --help

Methods: dense, oracle, quest, linear-<bits>, spotlight, with modifiers +sink<N> / +recent<N> (always keep the first /
last N rows) and +keep<P> (keep P % of the rows). From a notebook: `perplexity.run(perplexity.PerplexityConfig(...))`.
"""

from __future__ import annotations

import ast
import os
import pkgutil
from collections.abc import Sequence

DESCRIPTIONS = {
    "recall": "recall@k / IoU of selected tokens vs the oracle top-k of group-aggregated attention, per layer",
    "perplexity": "perplexity of dense vs sparse decoding",
    "passkey": "passkey / needle retrieval accuracy at long context",
    "fidelity": "output fidelity of sparse vs dense decoding",
}


def _inspect(name: str) -> tuple[bool, str]:
    """(is a subcommand: defines CONFIG and run, first docstring line), read without importing the module."""
    try:
        with open(os.path.join(__path__[0], f"{name}.py")) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return False, ""
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    names |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    doc = (ast.get_docstring(tree) or "").strip()
    return {"CONFIG", "run"} <= names, (doc.splitlines()[0] if doc else f"spotlight_jax.eval.{name}")


def subcommands() -> dict[str, str]:
    """name -> description for every module of this package that defines `CONFIG` and `run`."""
    out = {}
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if m.name.startswith("_"):
            continue
        ok, doc = _inspect(m.name)
        if ok:
            out[m.name] = DESCRIPTIONS.get(m.name) or doc
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from spotlight_jax.cli import dispatch

    return dispatch(argv, prog="spotlight-eval", description=__doc__, package=__name__, subcommands=subcommands())
