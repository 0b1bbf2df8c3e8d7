"""Jitted generation: chunked dense prefill, then a `lax.while_loop` of decode steps over a donated, preallocated cache.

`generate()` is the notebook entry point. The model (and hash modules) are split into `(graphdef, state)` and
merged inside one `jax.jit` program; per-call values (prompt lengths, max_new_tokens) are traced, and prompts are
right-padded to power-of-two buckets, so calls within a bucket reuse one compiled program.

Legend: B batch, T prompt bucket, S cache len, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from spotlight_jax import retrieval
from spotlight_jax.config import PrefillConfig, RetrievalConfig
from spotlight_jax.model import CausalLM, KVCache, init_cache
from spotlight_jax.prefill import prefill

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


def cache_bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest multiple of max(minimum, bucket(n) / 32) that is >= n: a cache of at most ~6 % more than needed
    (a power-of-two bucket of a 131,072-token prompt + 64 new tokens would double a whole KV cache), in steps of
    a power of two, so kernels that split the cache in power-of-two blocks still tile it."""
    step = max(minimum, bucket(n, 1) // 32)
    return -(-max(n, minimum) // step) * step


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
    static_argnames=(
        "graphdef",
        "hash_graphdef",
        "out_len",
        "sampling",
        "retrieval_cfg",
        "prefill_cfg",
        "chunk",
        "pad_id",
        "stream",
    ),
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
    stream_id: jax.Array,  # [] int32 traced: which registered streamer receives the tokens (with stream=True)
    *,
    out_len: int,
    sampling: SamplingConfig,
    retrieval_cfg: RetrievalConfig,
    prefill_cfg: PrefillConfig,
    chunk: int,
    pad_id: int,
    stream: bool = False,
):
    model = nnx.merge(graphdef, state)
    hashes = nnx.merge(hash_graphdef, hash_state) if hash_graphdef is not None else None
    emit = None
    if stream:
        # The start event returns a zero that the prompt depends on, so it runs before the prefill (a timestamp of
        # when the program began executing, after compilation and dispatch).
        tokens = tokens + io_callback(_stream_start, jax.ShapeDtypeStruct((), jnp.int32), stream_id, ordered=True)
        emit = lambda i, tok: io_callback(_stream_tokens, None, stream_id, i, tok, ordered=True)  # noqa: E731
    logits, cache = prefill(
        model, tokens, prompt_lengths, cache, chunk=chunk, retrieval_cfg=retrieval_cfg, hashes=hashes,
        prefill_cfg=prefill_cfg,
    )  # fmt: skip
    run = functools.partial(model, retrieval_cfg=retrieval_cfg, hashes=hashes, logits="last")
    return decode_loop(
        run, logits, cache, prompt_lengths, max_new_tokens, eos_ids, key,
        out_len=out_len, sampling=sampling, pad_id=pad_id, emit=emit,
    )  # fmt: skip


# Streaming: a compiled program calls back into Python through `io_callback` with a traced stream id, so one program
# serves every call (a Python callable baked into the program would force a recompile per streamer).
_STREAMERS: dict[int, Any] = {}
_NEXT_STREAM = itertools.count(1)


def _stream_start(stream_id) -> np.ndarray:
    streamer = _STREAMERS.get(int(stream_id))
    if streamer is not None and hasattr(streamer, "on_start"):
        streamer.on_start()
    return np.zeros((), np.int32)


def _stream_tokens(stream_id, i, tokens) -> None:
    streamer = _STREAMERS.get(int(stream_id))
    if streamer is not None:
        streamer(int(i), np.asarray(tokens))


def decode_loop(run, logits, cache, lengths, max_new_tokens, eos_ids, key, *, out_len, sampling, pad_id, emit=None):
    """The decode `while_loop` after a prefill: sample from `logits` [B, V], feed back, stop on EOS / budget.

    `run` is the model call with retrieval settings bound; `emit(i, tokens [B])`, if given, receives each step's
    tokens as they are produced (pad_id for finished rows). Returns (tokens [B, out_len], generated lengths [B]).
    """
    b = logits.shape[0]
    key, sub = jax.random.split(key)
    first = sample_token(logits, sub, sampling)

    def cond(carry):
        i, _, done, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, tok, done, lengths, cache, out, key = carry
        emitted = jnp.where(done, pad_id, tok)
        out = out.at[:, i].set(emitted)
        if emit is not None:
            emit(i, emitted)
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
    prefill_chunk: int | None = None,
    prefill_cfg: PrefillConfig = PrefillConfig(),
    streamer: Any = None,
) -> GenerateOutput:
    """Generate up to `max_new_tokens` per prompt in one jitted program.

    prompts: a string, a list of strings (needs `tokenizer`), one token list, or a batch of token lists of
    different lengths. `retrieval_cfg` picks decode attention (dense | oracle | linear | spotlight | quest);
    `linear`/`spotlight` need `hashes` (a `hashing.HashStack`). `max_len` fixes the cache size (default: a
    power-of-two bucket of prompt + new tokens). The prompt is prefilled in chunks of `prefill_chunk` tokens
    (default: `config.default_chunk` for the batch and backend; `prefill_cfg` also picks the chunk attention kernel).
    `streamer(i, tokens)`, if given, is called from inside the compiled loop with step i's tokens [B] (numpy int32;
    pad_id once a row has finished) as they are produced; an optional `streamer.on_start()` runs when the compiled
    program starts executing. Without a streamer the program has no callbacks at all.
    """
    rows = _as_token_lists(prompts, tokenizer)
    cfg = model.cfg
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(r) for r in rows)
    prompt_bucket = bucket(longest)
    out_len = bucket(max_new_tokens, minimum=8)
    # Sized from the buckets (not the exact lengths), so every call of a bucket pair shares one compiled program.
    cache_len = max_len if max_len is not None else cache_bucket(prompt_bucket + out_len)
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
    if prefill_chunk is not None:
        prefill_cfg = dataclasses.replace(prefill_cfg, chunk=prefill_chunk)
    chunk = prefill_cfg.chunk_for(len(rows), prompt_bucket, cache_len, jax.default_backend())
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
    stream_id = next(_NEXT_STREAM) if streamer is not None else 0
    if streamer is not None:
        _STREAMERS[stream_id] = streamer
    try:
        out, n_new = _generate_jit(
            graphdef, state, hash_graphdef, hash_state, jnp.asarray(tokens), jnp.asarray(lengths),
            jnp.int32(max_new_tokens), eos_arr, key, cache, jnp.int32(stream_id),
            out_len=out_len, sampling=sampling, retrieval_cfg=retrieval_cfg, prefill_cfg=prefill_cfg, chunk=chunk,
            pad_id=pad_id, stream=streamer is not None,
        )  # fmt: skip
        out = jax.block_until_ready(out)
    finally:
        _STREAMERS.pop(stream_id, None)
    out = np.asarray(out)[:, :max_new_tokens]
    n_new = np.asarray(n_new)
    text = None
    if tokenizer is not None:
        text = [tokenizer.decode(out[i, : n_new[i]].tolist(), skip_special_tokens=True) for i in range(len(rows))]
    return GenerateOutput(out, n_new, text)
