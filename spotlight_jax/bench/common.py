"""Shared benchmark plumbing: in-jit timing, roofline arithmetic and result files with their provenance."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

# Measured device-to-device copy ceilings (read + write): H100 3.0 TB/s (GPU.md), H200 4.3 TB/s (device KINDS.md).
# SPOTLIGHT_PEAK_TBS overrides; other devices fall back to the H100 figure.
HBM_BYTES_PER_S = {"H100": 3.0e12, "H200": 4.3e12}
RESULTS_DIR = Path(__file__).resolve().parents[2] / "experiments" / "results"


def provenance() -> dict:
    dev = jax.devices()[0]
    return {
        "device": getattr(dev, "device_kind", str(dev)),
        "backend": jax.default_backend(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "roofline_tbs": peak_bytes_per_s() / 1e12,
    }


def peak_bytes_per_s() -> float:
    """The roofline's bandwidth for the current device (bytes/s)."""
    if os.environ.get("SPOTLIGHT_PEAK_TBS"):
        return float(os.environ["SPOTLIGHT_PEAK_TBS"]) * 1e12
    kind = getattr(jax.devices()[0], "device_kind", "")
    return next((bw for name, bw in HBM_BYTES_PER_S.items() if name in kind), HBM_BYTES_PER_S["H100"])


def roofline_us(nbytes: float) -> float:
    return nbytes / peak_bytes_per_s() * 1e6


def time_jitted(fn: Callable, *args, repeats: int = 7, warmup: int = 1) -> list[float]:
    """Wall seconds of `fn(*args)` (already jitted, blocking on the result) over `repeats` runs after warm-up.

    Callers put many iterations inside `fn` (a fori_loop over changing inputs) so dispatch cost (~10-20 us) is
    amortised; the per-iteration time is the returned figure divided by that count.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def median(xs) -> float:
    return float(np.median(np.asarray(xs)))


def write_results(name: str, rows: list[dict], meta: dict | None = None, out_dir: str | os.PathLike | None = None):
    """Write `{name}.json` (rows + provenance) and `{name}.md` (a table) and return the markdown."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance()
    payload = {"benchmark": name, **prov, **(meta or {}), "rows": rows}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    md = markdown_table(rows)
    header = f"{name}: {prov['device']} ({prov['backend']}), jax {prov['jax']}, {prov['date']}\n\n"
    (out / f"{name}.md").write_text(header + md + "\n")
    return header + md


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(dict.fromkeys(k for r in rows for k in r))  # union of keys, first-seen order
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
