"""Helpers shared by the command lines (`python -m spotlight_jax.eval ...`, `python -m spotlight_jax.bench ...`).

The library raises ValueError; these turn it into the command's one-line exit message.
"""

from __future__ import annotations

from spotlight_jax.config import split_method


def method_fields(spec: str) -> dict:
    """'spotlight+sink4' -> RetrievalConfig fields {method, sink_tokens} (`config.split_method`); a bad spec exits
    with the parser's message."""
    try:
        name, fields = split_method(spec)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return {"method": name, **fields}
