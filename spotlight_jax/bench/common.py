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


def run_folder(tool: str, command: str, out_dir: str | os.PathLike | None = None) -> Path:
    """`out_dir` if given, else a new `runs/<tool>/<command>-<UTC time>/` below the working folder: a run never
    lands over the committed `experiments/results/` unless that folder is asked for."""
    if out_dir:
        return Path(out_dir)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / tool / f"{command}-{stamp}"


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


def profile_kernels(run: Callable[[], object], label: str, per: int = 1, top: int = 8) -> tuple[float, dict] | None:
    """Device time per kernel name from a profiler trace of one `run()`, divided by `per` (calls or steps in it).

    Prints the total and the `top` kernels; returns (device us per unit, {kernel: us per unit}) or None without a
    trace. The sum has no launch gaps: the wall time minus it is what the GPU spent idle between kernels.
    """
    import glob
    import gzip
    import tempfile
    from collections import defaultdict

    d = tempfile.mkdtemp()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        jax.block_until_ready(run())
    files = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)
    if not files:
        print("    (no trace)")
        return None
    with gzip.open(files[0]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pnames = {
        e["pid"]: e["args"].get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    tot, cnt = defaultdict(float), defaultdict(int)
    spans = defaultdict(list)  # per GPU process: (start, end) of its kernels
    for e in events:
        if e.get("ph") == "X" and "gpu" in pnames.get(e.get("pid"), "").lower() and "dur" in e:
            tot[e["name"]] += e["dur"]
            cnt[e["name"]] += 1
            spans[e["pid"]].append((e["ts"], e["ts"] + e["dur"]))
    if not tot:
        print("    no GPU kernels in the trace; processes:", sorted(set(pnames.values()))[:10])
        return None
    total = sum(tot.values()) / per
    print(f"    [profile {label}] device us/unit: {total:.1f} ({sum(cnt.values()) / per:.0f} kernels)")
    if len(spans) > 1:  # several GPUs: the sum above adds them; busy (union of kernel intervals) vs span per GPU
        for pid, iv in sorted(spans.items()):
            busy, span = busy_and_span(iv)
            print(f"      {pnames[pid][:40]}: busy {busy / per:.1f} us of a {span / per:.1f} us span per unit")
    for name, t in sorted(tot.items(), key=lambda kv: -kv[1])[:top]:
        print(f"      {t / per:8.2f} us  x{cnt[name] / per:.1f}  {name[:90]}")
    return total, {name: round(t / per, 2) for name, t in tot.items()}


# Where a decode step's device time goes: kernel name pattern -> category (first match wins; the rest is "other":
# XLA's small fusions such as norms, RoPE, scatters, pack_bits).
KERNEL_CATEGORIES = (
    ("topk", r"hamming_"),
    ("sparse_attention", r"sparse_decode_attention"),
    ("dense_attention", r"decode_attention"),
    ("prologue", r"decode_prologue"),
    ("collectives", r"all[_-]?reduce|all[_-]?gather|reduce[_-]?scatter|nccl"),
    ("gemm", r"gemm|gemv|cublas|cutlass|^dot|_dot"),
)


def kernel_categories(kernels: dict[str, float]) -> dict[str, float]:
    """{kernel name: us} -> {category: us} over `KERNEL_CATEGORIES` plus "other" (every category present, 0 if none)."""
    import re

    out = dict.fromkeys([c for c, _ in KERNEL_CATEGORIES] + ["other"], 0.0)
    for name, us in kernels.items():
        cat = next((c for c, pattern in KERNEL_CATEGORIES if re.search(pattern, name)), "other")
        out[cat] += us
    return out


def busy_and_span(intervals) -> tuple[float, float]:
    """(time covered by the union of [start, end) intervals, last end - first start): a GPU's kernel time without
    double-counting overlapping streams, and the wall span it ran in."""
    iv = sorted(intervals)
    busy, end = 0.0, float("-inf")
    for a, b in iv:
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    return busy, (iv[-1][1] - iv[0][0]) if iv else 0.0


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
    """Write `{name}.json` (rows + provenance) and `{name}.md` (a table) into `out_dir` (default: a new run folder,
    `run_folder`) and return the markdown."""
    out = run_folder("bench", name, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance()
    payload = {"benchmark": name, **prov, **(meta or {}), "rows": rows}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    md = markdown_table(rows)
    header = f"{name}: {prov['device']} ({prov['backend']}), jax {prov['jax']}, {prov['date']}\n\n"
    (out / f"{name}.md").write_text(header + md + "\n")
    return header + md + f"\n\nwrote {out / name}.json and .md"


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(dict.fromkeys(k for r in rows for k in r))  # union of keys, first-seen order
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
