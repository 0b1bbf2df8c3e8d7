"""Jitted generation: dense prefill, then a `lax.while_loop` of decode steps over a donated, preallocated cache.

`generate()` is the notebook entry point. The model (and hash modules) are split into `(graphdef, state)` and
merged inside one `jax.jit` program; per-call values (prompt lengths, max_new_tokens) are traced, and prompts are
right-padded to power-of-two buckets, so calls within a bucket reuse one compiled program.

Legend: B batch, T prompt bucket, S cache len, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spotlight_jax import retrieval
from spotlight_jax.config import RetrievalConfig
from spotlight_jax.model import CausalLM, KVCache, init_cache

# CPU has no buffer donation; the warning says nothing a user can act on.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy. top_k 0 / top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class GenerateOutput(NamedTuple):
    tokens: np.ndarray  # [B, max_new_tokens] int32; positions after EOS (or past the row's end) hold pad_id
    lengths: np.ndarray  # [B] generated tokens per row (including the EOS token when one was produced)
    text: list[str] | None  # decoded rows when a tokenizer was given


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def sample_token(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """logits [B, V] fp32 -> tokens [B] int32."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "hash_graphdef", "out_len", "sampling", "retrieval_cfg", "pad_id"),
    donate_argnames=("cache",),
)
def _generate_jit(
    graphdef,
    state,
    hash_graphdef,
    hash_state,
    tokens: jax.Array,  # [B, T] right-padded prompts
    prompt_lengths: jax.Array,  # [B]
    max_new_tokens: jax.Array,  # [] traced: no recompilation per value
    eos_ids: jax.Array,  # [E] (E >= 1; -1 = none)
    key: jax.Array,
    cache: KVCache,
    *,
    out_len: int,
    sampling: SamplingConfig,
    retrieval_cfg: RetrievalConfig,
    pad_id: int,
):
    model = nnx.merge(graphdef, state)
    hashes = nnx.merge(hash_graphdef, hash_state) if hash_graphdef is not None else None
    run = functools.partial(model, retrieval_cfg=retrieval_cfg, hashes=hashes, logits="last")

    prefill = run(tokens, cache=cache, lengths=prompt_lengths)
    return decode_loop(
        run, prefill.logits[:, 0], prefill.cache, prompt_lengths, max_new_tokens, eos_ids, key,
        out_len=out_len, sampling=sampling, pad_id=pad_id,
    )  # fmt: skip


def decode_loop(run, logits, cache, lengths, max_new_tokens, eos_ids, key, *, out_len, sampling, pad_id):
    """The decode `while_loop` after a prefill: sample from `logits` [B, V], feed back, stop on EOS / budget.

    `run` is the model call with retrieval settings bound. Returns (tokens [B, out_len], generated lengths [B]).
    """
    b = logits.shape[0]
    key, sub = jax.random.split(key)
    first = sample_token(logits, sub, sampling)

    def cond(carry):
        i, _, done, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, tok, done, lengths, cache, out, key = carry
        out = out.at[:, i].set(jnp.where(done, pad_id, tok))
        done = done | jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
        # The new token sits at position `lengths`; afterwards each row holds lengths + 1 live tokens.
        step = run(tok[:, None], positions=lengths[:, None], cache=cache, lengths=lengths + 1)
        key, sub = jax.random.split(key)
        nxt = sample_token(step.logits[:, 0], sub, sampling)
        return i + 1, nxt, done, lengths + 1, step.cache, out, key

    out = jnp.full((b, out_len), pad_id, jnp.int32)
    carry = (jnp.int32(0), first, jnp.zeros((b,), bool), lengths, cache, out, key)
    _, _, _, _, _, out, _ = jax.lax.while_loop(cond, body, carry)
    is_eos = jnp.any(out[..., None] == eos_ids, axis=-1)
    # Generated length: up to and including the first EOS, else max_new_tokens.
    first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens)
    return out, jnp.minimum(first_eos, max_new_tokens).astype(jnp.int32)


def _as_token_lists(prompts, tokenizer) -> list[list[int]]:
    if isinstance(prompts, str) or (
        isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int | np.integer)
    ):
        prompts = [prompts]
    rows = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("string prompts need a tokenizer: generate(model, prompts, tokenizer=tok)")
            p = tokenizer.encode(p)
        rows.append([int(t) for t in np.asarray(p).reshape(-1)])
    if not rows:
        raise ValueError("generate() got no prompts")
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    return rows


def generate(
    model: CausalLM,
    prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | np.ndarray,
    *,
    max_new_tokens: int = 32,
    tokenizer: Any = None,
    sampling: SamplingConfig = SamplingConfig(),
    key: jax.Array | None = None,
    retrieval_cfg: RetrievalConfig = RetrievalConfig(),
    hashes: Any = None,
    max_len: int | None = None,
    eos_token_ids: Sequence[int] | None = None,
    pad_id: int = 0,
) -> GenerateOutput:
    """Generate up to `max_new_tokens` per prompt in one jitted program.

    prompts: a string, a list of strings (needs `tokenizer`), one token list, or a batch of token lists of
    different lengths. `retrieval_cfg` picks decode attention (dense | oracle | linear | spotlight | quest);
    `linear`/`spotlight` need `hashes` (a `hashing.HashStack`). `max_len` fixes the cache size (default: a
    power-of-two bucket of prompt + new tokens).
    """
    rows = _as_token_lists(prompts, tokenizer)
    cfg = model.cfg
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(r) for r in rows)
    prompt_bucket = bucket(longest)
    out_len = bucket(max_new_tokens, minimum=8)
    cache_len = max_len if max_len is not None else bucket(prompt_bucket + out_len)
    if longest + max_new_tokens > cache_len:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} does not fit a cache of {cache_len} "
            "tokens: shorten the prompt, lower max_new_tokens or raise max_len"
        )
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context of "
            f"{cfg.max_position_embeddings} positions"
        )
    prompt_bucket = min(prompt_bucket, cache_len)
    if retrieval_cfg.method in retrieval.CODE_METHODS:
        if hashes is None:
            raise ValueError(f"retrieval method {retrieval_cfg.method!r} needs hash modules: pass hashes=HashStack")
        if getattr(hashes, "bits", retrieval_cfg.bits) != retrieval_cfg.bits:
            raise ValueError(f"hashes make {hashes.bits}-bit codes but retrieval_cfg.bits={retrieval_cfg.bits}")
        missing = [i for i in range(cfg.num_layers) if retrieval_cfg.is_sparse_layer(i) and i not in hashes]
        if missing:
            raise ValueError(f"no hash module for sparse layers {missing}: add them to dense_layers or retrain")

    tokens = np.full((len(rows), prompt_bucket), pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    lengths = np.array([len(r) for r in rows], np.int32)
    eos = list(eos_token_ids) if eos_token_ids is not None else list(cfg.eos_token_ids)
    if tokenizer is not None and eos_token_ids is None and tokenizer.eos_token_id is not None:
        eos = sorted(set(eos) | {int(tokenizer.eos_token_id)})
    eos_arr = jnp.asarray(eos or [-1], jnp.int32)
    key = key if key is not None else jax.random.key(0)

    graphdef, state = nnx.split(model)
    hash_graphdef, hash_state = nnx.split(hashes) if hashes is not None else (None, None)
    cache = init_cache(cfg, len(rows), cache_len, model.dtype, retrieval_cfg)
    out, n_new = _generate_jit(
        graphdef, state, hash_graphdef, hash_state, jnp.asarray(tokens), jnp.asarray(lengths),
        jnp.int32(max_new_tokens), eos_arr, key, cache,
        out_len=out_len, sampling=sampling, retrieval_cfg=retrieval_cfg, pad_id=pad_id,
    )  # fmt: skip
    out = np.asarray(out)[:, :max_new_tokens]
    n_new = np.asarray(n_new)
    text = None
    if tokenizer is not None:
        text = [tokenizer.decode(out[i, : n_new[i]].tolist(), skip_special_tokens=True) for i in range(len(rows))]
    return GenerateOutput(out, n_new, text)
