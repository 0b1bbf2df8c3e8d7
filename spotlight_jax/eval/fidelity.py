"""`python -m spotlight_jax.eval fidelity`: how often each method's greedy tokens equal dense decoding's.

Held-out prompts of --prompt-len tokens are prefilled densely once; each method then decodes --new-tokens greedily
through its own decode path. Reported: the share of positions whose token equals dense's, and the mean length of
the prefix that agrees exactly.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from tqdm.auto import tqdm

from spotlight_jax.bench.common import run_folder
from spotlight_jax.cli import option
from spotlight_jax.eval import decoding
from spotlight_jax.eval.perplexity import write_report


@dataclasses.dataclass(frozen=True)
class FidelityConfig(decoding.DecodeEvalConfig):
    num_prompts: int = option(50, "held-out prompts")
    prompt_len: int = option(2048, "tokens per prompt")
    new_tokens: int = option(64, "tokens each method decodes greedily")
    batch: int = option(5, "prompts decoded together")


CONFIG = FidelityConfig


def build_tokens(cfg: FidelityConfig, tokenizer) -> dict:
    from spotlight_jax.data import pack_samples

    prompts = pack_samples(
        decoding.eval_texts(cfg), tokenizer, cfg.prompt_len, cfg.num_prompts, shuffle_seed=cfg.seed + 1
    )
    return {"prompts": prompts}


def run(cfg: FidelityConfig) -> dict:
    """Agreement of each method's greedy tokens with dense decoding's; writes fidelity.{json,md}, returns the report."""
    cfg.check()
    out_dir = run_folder("eval", "fidelity", cfg.out_dir)
    model, tokenizer = decoding.load_eval_model(cfg)
    data, data_label = decoding.tokens_or_build(cfg, lambda: build_tokens(cfg, tokenizer))
    prompts = data["prompts"]
    setups = [decoding.method_setup(name, model.cfg, cfg) for name in cfg.methods]
    if setups[0][0] != "dense":
        setups.insert(0, decoding.method_setup("dense", model.cfg, cfg))
    outs = {label: [] for label, _, _ in setups}
    t0 = time.perf_counter()
    for lo in tqdm(range(0, len(prompts), cfg.batch), desc="fidelity batches", unit="batch"):
        chunk = prompts[lo : lo + cfg.batch]
        shared, logits, lengths = decoding.prefill_batch(model, chunk, chunk.shape[1] + cfg.new_tokens)
        for label, rcfg, hashes in setups:
            parts = decoding.split_model(model, hashes)
            cache = decoding.with_codes(parts[2], parts[3], decoding.copy_cache(shared), retrieval_cfg=rcfg)
            toks = decoding.greedy_decode(*parts, cache, logits, lengths, retrieval_cfg=rcfg, out_len=cfg.new_tokens)
            outs[label].append(np.asarray(toks))
    dense = np.concatenate(outs["dense"])
    rows = []
    for label in outs:
        toks = np.concatenate(outs[label])
        same = toks == dense
        prefix = np.where(same.all(1), same.shape[1], np.argmin(same, axis=1))
        rows.append({
            "method": label, "same_token_pct": round(100 * float(same.mean()), 2),
            "identical_rows_pct": round(100 * float(same.all(1).mean()), 1),
            "mean_agreeing_prefix": round(float(prefix.mean()), 1),
        })  # fmt: skip
    meta = {
        "num_prompts": int(len(prompts)), "prompt_len": int(prompts.shape[1]), "new_tokens": cfg.new_tokens,
        "keep_ratio": cfg.keep_ratio, "min_keep": cfg.min_keep, "seconds": round(time.perf_counter() - t0, 1),
        "data": data_label,
    }  # fmt: skip
    return write_report(out_dir, "fidelity", rows, meta)
