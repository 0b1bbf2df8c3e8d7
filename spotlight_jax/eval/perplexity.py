"""`python -m spotlight_jax.eval perplexity`: perplexity teacher-forced through the sparse decode path.

Sequences of --seq-len tokens (held-out documents); the first --prefix tokens are prefilled densely, every later
position is a decode step of the method under test (`decoding.teacher_forced_nll`). Reports perplexity per method,
its ratio to dense, and a plot of the running NLL against position; when the methods come at several keep ratios
(``oracle+keep5``, ...), also perplexity against the kept share of rows (``perplexity_vs_keep.png``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from spotlight_jax.bench.common import markdown_table, provenance, run_folder
from spotlight_jax.cli import option
from spotlight_jax.eval import decoding


@dataclasses.dataclass(frozen=True)
class PerplexityConfig(decoding.DecodeEvalConfig):
    seq_len: int = option(4096, "tokens per held-out sequence")
    prefix: int = option(1024, "densely prefilled tokens; later positions are decoded")
    num_seqs: int = option(8, "held-out sequences")
    batch: int = option(4, "sequences decoded together")


CONFIG = PerplexityConfig


def build_tokens(cfg: PerplexityConfig, tokenizer) -> dict:
    from spotlight_jax.data import pack_samples

    seqs = pack_samples(decoding.eval_texts(cfg), tokenizer, cfg.seq_len, cfg.num_seqs, shuffle_seed=cfg.seed)
    return {"sequences": seqs}


def run(cfg: PerplexityConfig) -> dict:
    """Perplexity of each method; writes perplexity.{json,md,png} (+ perplexity_vs_keep.png) and returns the report."""
    cfg.check()
    if not cfg.tokens and cfg.seq_len <= cfg.prefix + 1:
        raise ValueError(f"seq_len {cfg.seq_len} leaves nothing to decode after prefix {cfg.prefix}")
    out_dir = run_folder("eval", "perplexity", cfg.out_dir)
    model, tokenizer = decoding.load_eval_model(cfg)
    data, data_label = decoding.tokens_or_build(cfg, lambda: build_tokens(cfg, tokenizer))
    seqs = data["sequences"]
    if seqs.shape[1] <= cfg.prefix + 1:
        raise ValueError(f"sequences of {seqs.shape[1]} tokens leave nothing to decode after prefix {cfg.prefix}")
    setups = [decoding.method_setup(name, model.cfg, cfg) for name in cfg.methods]
    nlls = {label: [] for label, _, _ in setups}
    seconds = dict.fromkeys(nlls, 0.0)
    for lo in tqdm(range(0, len(seqs), cfg.batch), desc="perplexity batches", unit="batch"):
        chunk = seqs[lo : lo + cfg.batch]
        shared, _, _ = decoding.prefill_batch(model, chunk[:, : cfg.prefix], chunk.shape[1])
        for label, rcfg, hashes in setups:
            t0 = time.perf_counter()
            parts = decoding.split_model(model, hashes)
            cache = decoding.with_codes(parts[2], parts[3], decoding.copy_cache(shared), retrieval_cfg=rcfg)
            nll = decoding.teacher_forced_nll(*parts, jnp.asarray(chunk), cache, retrieval_cfg=rcfg, prefix=cfg.prefix)
            nlls[label].append(np.asarray(nll))
            seconds[label] += time.perf_counter() - t0
    rows, curves = [], {}
    keeps = {label: (None if rcfg.method == "dense" else rcfg.keep_ratio) for label, rcfg, _ in setups}
    for label in nlls:
        nll = np.concatenate(nlls[label])  # [num_seqs, positions]
        curves[label] = nll.mean(0)
        mean = float(nll.mean())
        rows.append({"method": label, "keep_ratio": keeps[label], "ppl": math.exp(mean), "nll": mean,
                     "tokens": int(nll.size), "seconds": round(seconds[label], 1)})  # fmt: skip
        print(rows[-1], flush=True)
    dense = next((r["ppl"] for r in rows if r["method"] == "dense"), None)
    for r in rows:
        if dense:
            r["vs_dense_pct"] = round(100 * (r["ppl"] / dense - 1), 2)
        r["ppl"] = round(r["ppl"], 4)
        r["nll"] = round(r["nll"], 5)
    meta = {
        "seq_len": int(seqs.shape[1]), "prefix": cfg.prefix, "num_seqs": int(len(seqs)),
        "keep_ratio": cfg.keep_ratio, "min_keep": cfg.min_keep, "data": data_label,
    }  # fmt: skip
    report = write_report(out_dir, "perplexity", rows, meta)
    plot_curves(curves, cfg.prefix, os.path.join(out_dir, "perplexity.png"))
    if len({r["keep_ratio"] for r in rows if r["keep_ratio"] is not None}) > 1:
        plot_vs_keep(rows, dense, os.path.join(out_dir, "perplexity_vs_keep.png"))
    return report


def method_family(label: str) -> str:
    """'spotlight-128+keep5+sink4' -> 'spotlight-128+sink4': the method without its keep-ratio modifier."""
    return re.sub(r"\+keep[0-9.]+", "", label)


def plot_vs_keep(rows, dense_ppl, path):
    """Perplexity against the kept share of rows, one line per method family, with dense and +1 % / +3 % bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4))
    families = {}
    for r in rows:
        if r["keep_ratio"] is not None:
            families.setdefault(method_family(r["method"]), []).append((100 * r["keep_ratio"], r["ppl"]))
    for fam, pts in families.items():
        x, y = zip(*sorted(pts), strict=True)
        ax.plot(x, y, marker="o", label=fam)
    if dense_ppl:
        for pct, style in ((0, "-"), (1, ":"), (3, "--")):
            label = "dense" if not pct else f"dense + {pct} %"
            ax.axhline(dense_ppl * (1 + pct / 100), color="k", ls=style, lw=1, label=label)
    ax.set_xscale("log")
    ax.set_xticks(sorted({x for pts in families.values() for x, _ in pts}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("rows kept per step (% of the context)")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir, name, rows, meta) -> dict:
    """`<out_dir>/<name>.json` (rows + provenance) and `.md`; prints the table and returns the JSON payload."""
    os.makedirs(out_dir, exist_ok=True)
    prov = provenance()
    payload = {"eval": name, **prov, **meta, "rows": rows}
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=2)
    md = f"{name}: {prov['device']}, jax {prov['jax']}, {prov['date']}; {json.dumps(meta)}\n\n" + markdown_table(rows)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    print(f"wrote {os.path.join(out_dir, name)}.json and .md")
    return payload


def plot_curves(curves, prefix, path, window=128):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, c in curves.items():
        smooth = np.convolve(c, np.ones(window) / window, mode="valid")
        ax.plot(prefix + window // 2 + np.arange(len(smooth)), smooth, label=label, lw=1)
    ax.set_xlabel("position (decoded through the method)")
    ax.set_ylabel(f"NLL (moving mean, {window} tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
