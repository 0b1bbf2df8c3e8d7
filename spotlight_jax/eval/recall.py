"""Recall / IoU of retrieved tokens vs the oracle top-k of group-aggregated attention, per layer.

    python -m spotlight_jax.eval recall \\
        --hashes spotlight-128=runs/recall/spot128/hashes spotlight-64=runs/recall/spot64/hashes \\
        --linear-bits 128 256 512 1024 --data ../shared/data/pydocs.jsonl.gz --data-part heldout \\
        --out-dir runs/eval/recall-pydocs

For each held-out sample, layer and sampled query position p (p >= --min-position), the oracle set is the
`budget(p) = max(min_keep, ceil(keep_ratio * (p + 1)))` keys with the largest causal softmax attention summed over
the KV head's G query heads; a method selects `budget(p)` keys by its own score: Spotlight / LinearHash use the
decoder's scoring (packed codes -> `pallas_kernels.hamming_scores`, XNOR-popcount summed over the group; ties
broken at random), `random` scores uniformly. recall = |sel ∩ oracle| / |oracle|, IoU = |sel ∩ oracle| /
|sel ∪ oracle|, averaged over (sample, KV head, query). Writes <out-dir>/<name>.json, .csv, .md and .png.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from spotlight_jax.activations import ActivationReader, collect_activations, read_manifest
from spotlight_jax.bench.common import run_folder
from spotlight_jax.cli import model_field, option, out_dir_field
from spotlight_jax.hashing import LinearHash, load_hashes
from spotlight_jax.losses import group_attention, sample_query_positions, topk_mask


def _hamming(q_codes, k_codes):
    """q_codes [B, N, Q, W], k_codes [B, K, S, W] -> int32 [B, K, Q, S] (the decoder's scoring, per query)."""
    from pallas_kernels import hamming_scores

    return jax.vmap(hamming_scores, in_axes=(2, None), out_axes=2)(q_codes, k_codes)


def overlap(sel: jax.Array, oracle: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sel, oracle: bool [..., S] -> (recall [...], iou [...])."""
    inter = jnp.sum(sel & oracle, axis=-1)
    return inter / jnp.maximum(jnp.sum(oracle, axis=-1), 1), inter / jnp.maximum(jnp.sum(sel | oracle, axis=-1), 1)


def layer_recall(method, q, k, q_pos, *, keep_ratio: float, min_keep: int, seed: int) -> dict[str, float]:
    """method: a hash module (`query_codes` / `key_codes`) or "random"; q [B, N, T, H], k [B, K, T, H], q_pos [B, Q]."""
    graphdef, state = (None, None) if isinstance(method, str) else nnx.split(method)
    rec, iou = _layer_recall_jit(graphdef, state, q, k, q_pos, keep_ratio=keep_ratio, min_keep=min_keep, seed=seed)
    return {"recall": float(rec), "iou": float(iou)}


def _layer_recall(graphdef, state, q, k, q_pos, *, keep_ratio, min_keep, seed):
    q_sel = jnp.take_along_axis(q, q_pos[:, None, :, None], axis=2)  # [B, N, Q, H]
    att = group_attention(q_sel, k, q_pos)  # [B, K, Q, S]
    oracle = topk_mask(att, q_pos[:, None, :], keep_ratio, min_keep)
    if graphdef is None:
        scores = jax.random.uniform(jax.random.key(seed), att.shape)
        sel = topk_mask(scores, q_pos[:, None, :], keep_ratio, min_keep)
    else:
        h = nnx.merge(graphdef, state)
        scores = _hamming(h.query_codes(q_sel), h.key_codes(k))  # [B, K, Q, S] int32
        sel = topk_mask(scores, q_pos[:, None, :], keep_ratio, min_keep, seed=seed)
    rec, iou = overlap(sel, oracle)
    return jnp.mean(rec), jnp.mean(iou)


_layer_recall_jit = jax.jit(_layer_recall, static_argnames=("graphdef", "keep_ratio", "min_keep", "seed"))


def evaluate(
    acts,
    methods: dict[str, Any],
    layers: list[int],
    *,
    queries: int = 256,
    min_position: int = 512,
    keep_ratio: float = 0.02,
    min_keep: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict[int, dict[str, float]]]:
    """methods: name -> (layer -> hash module) callable, or "random". -> name -> layer -> {recall, iou}."""
    out: dict[str, dict[int, dict[str, float]]] = {name: {} for name in methods}
    n_samples = acts.num_samples
    bar = tqdm(total=len(layers) * len(methods), desc="recall", disable=not progress)
    for layer in layers:
        for name, get in methods.items():
            module = get if get == "random" else get(layer)
            vals = []
            for s in range(n_samples):
                q, k = acts.get(layer, [s])
                q_pos = sample_query_positions(jax.random.key(seed * 1000 + s), 1, acts.seq_len, queries, min_position)
                vals.append(
                    layer_recall(module, jnp.asarray(q), jnp.asarray(k), q_pos, keep_ratio=keep_ratio,
                                 min_keep=min_keep, seed=seed + s)
                )  # fmt: skip
            out[name][layer] = {m: float(np.mean([v[m] for v in vals])) for m in ("recall", "iou")}
            bar.update(1)
    bar.close()
    return out


def write_outputs(out: str, results: dict, bits: dict[str, int], info: dict[str, Any]) -> dict[str, str]:
    """<out>.json / .csv / .md tables and <out>.png (recall vs bits + per-layer recall)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    names = list(results)
    layers = sorted({layer for r in results.values() for layer in r})
    mean = {n: {m: float(np.mean([results[n][la][m] for la in layers])) for m in ("recall", "iou")} for n in names}
    with open(out + ".json", "w") as f:
        json.dump({"info": info, "mean": mean, "per_layer": {n: {str(k): v for k, v in r.items()} for n, r in
                   results.items()}, "bits": bits}, f, indent=2)  # fmt: skip
    with open(out + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "bits", "layer", "recall", "iou"])
        for n in names:
            for la in layers:
                w.writerow([n, bits.get(n, ""), la, f"{results[n][la]['recall']:.4f}", f"{results[n][la]['iou']:.4f}"])
            w.writerow([n, bits.get(n, ""), "mean", f"{mean[n]['recall']:.4f}", f"{mean[n]['iou']:.4f}"])
    lines = [
        f"# Recall@{info['keep_ratio']:.0%} vs oracle (group-aggregated attention) — {info.get('model', '')}",
        "",
        f"{info.get('data', '')}; {info['samples']} samples x {info['seq_len']} tokens, {info['queries']} queries "
        f"per sample at positions >= {info['min_position']}, budget max({info['min_keep']}, ceil({info['keep_ratio']}"
        f" (p+1))), layers {layers[0]}..{layers[-1]}.",
        "",
        "| method | bits | recall (mean over layers) | IoU |",
        "|---|---:|---:|---:|",
    ]
    for n in sorted(names, key=lambda n: (n.split("-")[0], bits.get(n, 0))):
        lines.append(f"| {n} | {bits.get(n, '—')} | {mean[n]['recall']:.4f} | {mean[n]['iou']:.4f} |")
    lines += ["", "Per layer recall:", "", "| layer | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for la in layers:
        lines.append(f"| {la} | " + " | ".join(f"{results[n][la]['recall']:.3f}" for n in names) + " |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    families: dict[str, list[tuple[int, float]]] = {}
    for n in names:
        if n in bits:
            families.setdefault(n.rsplit("-", 1)[0], []).append((bits[n], mean[n]["recall"]))
    for fam, pts in families.items():
        pts.sort()
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=fam)
        for x, y in pts:
            ax1.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if "random" in mean:
        ax1.axhline(mean["random"]["recall"], color="gray", ls="--", label="random")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("code bits per token")
    ax1.set_ylabel(f"recall@{info['keep_ratio']:.0%} (mean over layers)")
    ax1.set_title("recall vs bits")
    ax1.grid(alpha=0.3)
    ax1.legend()
    for n in names:
        ax2.plot(layers, [results[n][la]["recall"] for la in layers], label=n, lw=1.2)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("recall")
    ax2.set_title("per layer")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{info.get('model', '')}: selected tokens vs oracle top {info['keep_ratio']:.0%}")
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)
    plt.close(fig)
    return {k: out + k for k in (".json", ".csv", ".md", ".png")}


@dataclasses.dataclass(frozen=True)
class RecallConfig:
    hashes: tuple[str, ...] = option(
        (), "exported Spotlight hashes to evaluate, each NAME=PATH or PATH (named spotlight-<bits>), e.g. "
        "spotlight-128=runs/x/hashes (default: none)", metavar="[NAME=]PATH", sep=None,
    )  # fmt: skip
    linear_bits: tuple[int, ...] = option(
        (128, 256, 512, 1024), "LinearHash (random projection) baselines at these code lengths", nargs="*"
    )
    random: bool = option(True, "also the random-selection floor")
    activations_dir: str = option(
        "runs/recall/acts-heldout", "held-out activation cache (collected with the data options when missing)"
    )
    model: str | None = model_field()
    data: str = option("stdlib", "data source (see spotlight_jax.data)", aliases=("dataset",))
    data_part: str = option("heldout", "documents to sample", choices=("all", "train", "heldout"))
    heldout_fraction: float = option(0.2, "share of documents held out")
    num_samples: int = option(4, "samples of the activation cache")
    seq_len: int = option(2048, "tokens per sample")
    layers: tuple[int, ...] | None = option(None, "layers to evaluate (default: every layer >= 2)", type=int, nargs="+")
    queries: int = option(256, "sampled query positions per sample")
    min_position: int = option(512, "queries at positions >= this")
    keep_ratio: float = option(0.02, "share of the causal keys selected")
    min_keep: int = option(20, "fewest keys selected")
    seed: int = option(0, "seed of the linear hashes and of the query positions")
    out_dir: str | None = out_dir_field("eval")
    name: str = option("recall", "stem of the result files")


CONFIG = RecallConfig


def _hash_specs(specs) -> list[tuple[str, str]]:
    """'NAME=PATH' or a bare PATH (named spotlight-<bits> once loaded) -> [(name or '', path)]."""
    out = []
    for spec in specs:
        name, eq, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        if (eq and not name) or not path:
            raise ValueError(f"hashes are given as NAME=PATH or PATH (e.g. spotlight-128=runs/x/hashes), got {spec!r}")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"hash checkpoint folder not found: {path}")
        out.append((name, path))
    return out


def run(cfg: RecallConfig) -> dict:
    """Recall / IoU per method and layer; writes <out_dir>/<name>.{json,csv,md,png} and returns the results."""
    t0 = time.time()
    specs = _hash_specs(cfg.hashes)  # before any model work: a typo fails in a moment
    path = cfg.activations_dir
    try:
        m = read_manifest(path)
        complete = m.get("completed") == m.get("num_samples")
    except Exception:
        complete = False
    if complete:
        acts = ActivationReader(path)
    else:
        from spotlight_jax import data
        from spotlight_jax.convert import load_model

        model, tok = load_model(cfg.model)
        samples, info = data.build_samples(
            tok, cfg.data, seq_len=cfg.seq_len, num_samples=cfg.num_samples, part=cfg.data_part,
            heldout_fraction=cfg.heldout_fraction, seed=0, eos_id=(model.cfg.eos_token_ids or (None,))[0],
        )  # fmt: skip
        acts = collect_activations(model, samples, path, range(2, model.cfg.num_layers), data_info=info)
    mcfg = acts.model_cfg
    layers = list(cfg.layers) if cfg.layers else [i for i in acts.layers if i >= 2]

    methods: dict[str, Any] = {}
    bits: dict[str, int] = {}
    for name, hpath in specs:
        stack = load_hashes(hpath, mcfg)
        name = name or f"spotlight-{stack.bits}"
        methods[name] = stack.for_layer
        bits[name] = stack.bits
    for b in cfg.linear_bits:
        name = f"linear-{b}"
        key = jax.random.fold_in(jax.random.key(cfg.seed), b)
        mods = {
            i: LinearHash(mcfg.num_kv_heads, mcfg.head_dim, num_heads=mcfg.num_heads, bits=b,
                          rngs=nnx.Rngs(params=jax.random.fold_in(key, i)))
            for i in layers
        }  # fmt: skip
        methods[name] = mods.__getitem__
        bits[name] = b
    if cfg.random:
        methods["random"] = "random"
    results = evaluate(
        acts, methods, layers, queries=cfg.queries, min_position=cfg.min_position, keep_ratio=cfg.keep_ratio,
        min_keep=cfg.min_keep, seed=cfg.seed,
    )  # fmt: skip
    info = {
        "model": acts.model_name,
        "data": json.dumps(acts.manifest.get("data", {})),
        "samples": acts.num_samples,
        "seq_len": acts.seq_len,
        "queries": cfg.queries,
        "min_position": cfg.min_position,
        "keep_ratio": cfg.keep_ratio,
        "min_keep": cfg.min_keep,
        "hashes": list(cfg.hashes),
        "seconds": round(time.time() - t0, 1),
    }
    files = write_outputs(os.path.join(run_folder("eval", "recall", cfg.out_dir), cfg.name), results, bits, info)
    with open(files[".md"]) as f:
        print(f.read())
    print("wrote", ", ".join(files.values()))
    return results
