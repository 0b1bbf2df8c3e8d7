"""`python -m spotlight_jax.eval passkey`: find a random 5-digit pass key hidden in long real text.

For each context length and depth, the key sentence is inserted at that depth of held-out text; the prompt ends
with the question. Prefill is dense (shared by all methods); the answer is decoded greedily through each method's
decode path, so retrieval has to find the key among the cached tokens. Success = the key appears in the answer.
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

INTRO = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. I will ask you for it.\n\n"
)
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class PasskeyConfig(decoding.DecodeEvalConfig):
    lengths: tuple[int, ...] = option((2048, 4096, 7168), "prompt lengths in tokens")
    depths: int = option(10, "needle depths, evenly spaced in [0.05, 0.95]")
    answer_tokens: int = option(8, "tokens decoded for the answer")
    batch: int = option(2, "prompts prefilled together")


CONFIG = PasskeyConfig


def build_tokens(cfg: PasskeyConfig, tokenizer) -> dict:
    """One prompt per (length, depth), as int32 rows of exactly `length` tokens, plus the keys."""
    rng = np.random.default_rng(cfg.seed)
    filler = []
    for text in decoding.eval_texts(cfg):
        filler += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(filler) > max(cfg.lengths):
            break
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    depths = np.linspace(0.05, 0.95, cfg.depths)
    out = {}
    for length in cfg.lengths:
        rows, keys = [], []
        for d in depths:
            key = int(rng.integers(10000, 100000))
            needle, intro, question = enc(NEEDLE.format(key=key)), enc(INTRO), enc(QUESTION)
            n_fill = length - len(intro) - len(needle) - len(question)
            if n_fill < 1 or n_fill > len(filler):
                raise ValueError(f"cannot build a {length}-token prompt from {len(filler)} tokens of filler text")
            at = int(d * n_fill)
            rows.append(intro + filler[:at] + needle + filler[at:n_fill] + question)
            keys.append(key)
        out[f"prompts_{length}"] = np.asarray(rows, np.int32)
        out[f"keys_{length}"] = np.asarray(keys, np.int64)
    out["depths"] = depths
    return out


def run(cfg: PasskeyConfig) -> dict:
    """Passkey success rate per method and prompt length; writes passkey.{json,md} and returns the report."""
    cfg.check()
    out_dir = run_folder("eval", "passkey", cfg.out_dir)
    model, tokenizer = decoding.load_eval_model(cfg)
    data, data_label = decoding.tokens_or_build(cfg, lambda: build_tokens(cfg, tokenizer))
    setups = [decoding.method_setup(name, model.cfg, cfg) for name in cfg.methods]
    hits = {(label, L): [] for label, _, _ in setups for L in cfg.lengths}
    answers = []
    t0 = time.perf_counter()
    for length in cfg.lengths:
        prompts, keys = data[f"prompts_{length}"], data[f"keys_{length}"]
        for lo in tqdm(range(0, len(prompts), cfg.batch), desc=f"passkey {length} tokens", unit="batch"):
            chunk = prompts[lo : lo + cfg.batch]
            shared, logits, lengths = decoding.prefill_batch(model, chunk, length + cfg.answer_tokens)
            for label, rcfg, hashes in setups:
                parts = decoding.split_model(model, hashes)
                cache = decoding.with_codes(parts[2], parts[3], decoding.copy_cache(shared), retrieval_cfg=rcfg)
                toks = decoding.greedy_decode(
                    *parts, cache, logits, lengths, retrieval_cfg=rcfg, out_len=cfg.answer_tokens
                )
                for j, row in enumerate(np.asarray(toks)):
                    text = tokenizer.decode(row.tolist(), skip_special_tokens=True)
                    key = str(int(keys[lo + j]))
                    hits[(label, length)].append(key in text)
                    answers.append({"method": label, "length": length, "key": key, "answer": text})
    rows = []
    for label, _, _ in setups:
        row = {"method": label}
        for length in cfg.lengths:
            row[f"{length}"] = round(100 * float(np.mean(hits[(label, length)])), 1)
        row["all"] = round(100 * float(np.mean([h for L in cfg.lengths for h in hits[(label, L)]])), 1)
        rows.append(row)
    dense = next((r["all"] for r in rows if r["method"] == "dense"), None)
    for r in rows:
        if dense is not None:
            r["vs_dense_points"] = round(r["all"] - dense, 1)
    meta = {
        "unit": "success rate in % per prompt length (tokens)", "depths": [round(float(d), 3) for d in data["depths"]],
        "keep_ratio": cfg.keep_ratio, "min_keep": cfg.min_keep, "seconds": round(time.perf_counter() - t0, 1),
        "data": data_label, "sample_answers": answers[:: max(1, len(answers) // 12)],
    }  # fmt: skip
    return write_report(out_dir, "passkey", rows, meta)
