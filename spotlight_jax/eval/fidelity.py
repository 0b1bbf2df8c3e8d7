"""`python -m spotlight_jax.eval fidelity`: how often each method's greedy tokens equal dense decoding's.

Held-out prompts of --prompt-len tokens are prefilled densely once; each method then decodes --new-tokens greedily
through its own decode path. Reported: the share of positions whose token equals dense's, and the mean length of
the prefix that agrees exactly.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from tqdm.auto import tqdm

from spotlight_jax.eval import decoding
from spotlight_jax.eval.perplexity import write_report


def add_arguments(p: argparse.ArgumentParser):
    decoding.add_common_arguments(p, methods=("dense", "oracle", "linear-128", "linear-1024", "spotlight"))
    p.add_argument("--num-prompts", type=int, default=50)
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=5)


def build_tokens(args, tokenizer) -> dict:
    from spotlight_jax.data import pack_samples

    prompts = pack_samples(
        decoding.eval_texts(args), tokenizer, args.prompt_len, args.num_prompts, shuffle_seed=args.seed + 1
    )
    return {"prompts": prompts}


def run(args):
    model, _ = decoding.load_eval_model(args)
    prompts = decoding.tokens_or_build(args, lambda: build_tokens(args, _))["prompts"]
    setups = [decoding.method_setup(name, model.cfg, args) for name in args.methods]
    if setups[0][0] != "dense":
        setups.insert(0, decoding.method_setup("dense", model.cfg, args))
    outs = {label: [] for label, _, _ in setups}
    t0 = time.perf_counter()
    for lo in tqdm(range(0, len(prompts), args.batch), desc="fidelity batches", unit="batch"):
        chunk = prompts[lo : lo + args.batch]
        shared, logits, lengths = decoding.prefill_batch(model, chunk, chunk.shape[1] + args.new_tokens)
        for label, rcfg, hashes in setups:
            parts = decoding.split_model(model, hashes)
            cache = decoding.with_codes(parts[2], parts[3], decoding.copy_cache(shared), retrieval_cfg=rcfg)
            toks = decoding.greedy_decode(*parts, cache, logits, lengths, retrieval_cfg=rcfg, out_len=args.new_tokens)
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
        "num_prompts": int(len(prompts)), "prompt_len": int(prompts.shape[1]), "new_tokens": args.new_tokens,
        "keep_ratio": args.keep_ratio, "min_keep": args.min_keep, "seconds": round(time.perf_counter() - t0, 1),
        "data": decoding.data_label(args),
    }  # fmt: skip
    write_report(args.out, "fidelity", rows, meta)
