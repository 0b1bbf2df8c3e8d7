"""Small file helpers shared by the stages that write JSON beside their arrays (activations, hash exports)."""

from __future__ import annotations

import json
import os
from typing import Any


def read_json(path: str | os.PathLike, error: type[Exception], missing: str) -> dict[str, Any]:
    """Parse the JSON file at `path`; raise `error(missing)` when it is absent and `error` naming it when corrupt."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise error(missing)
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"corrupt {path}: {e}") from e
