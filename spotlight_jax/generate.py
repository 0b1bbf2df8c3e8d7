"""Jitted generation: chunked dense prefill, then a `lax.while_loop` of decode steps over a donated, preallocated cache.

`generate()` is the notebook entry point, `chat()` its chat-template shortcut and `python -m spotlight_jax.generate`
(`spotlight-generate`) the command line. The model (and hash modules) are split into `(graphdef, state)` and merged
inside one `jax.jit` program; per-call values (prompt lengths, max_new_tokens, EOS ids, stop strings and the sampling
values temperature / top_k / top_p / do_sample / key) are traced, and prompts are right-padded to power-of-two
buckets, so calls within a bucket reuse one compiled program.

Legend: B batch, T prompt bucket, S cache len, V vocab, E EOS ids, N stop strings, L longest stop string (tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from spotlight_jax import retrieval
from spotlight_jax.config import METHODS, PrefillConfig, RetrievalConfig
from spotlight_jax.model import CausalLM, KVCache, init_cache
from spotlight_jax.prefill import prefill

# CPU has no buffer donation; the warning says nothing a user can act on.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
# `python -m spotlight_jax.generate`: the package's __init__ imports this module before runpy executes it as
# __main__, and runpy warns about that. The `__main__` block below runs the imported module's main(), so the
# warning says nothing a user can act on.
warnings.filterwarnings(
    "ignore", message="'spotlight_jax.generate' found in sys.modules after import of package", category=RuntimeWarning
)

MIN_BUCKET = 16
MIN_EOS_SLOTS = 8  # EOS ids are padded to a multiple of this (-1 = none), so their number never recompiles
MIN_STOP_SHAPE = (4, 8)  # stop strings x tokens, padded to powers of two at least this large


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool | np.bool_)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool | np.bool_)


class SamplingParams(NamedTuple):
    """The traced form of a `SamplingConfig` (scalars; a new value never recompiles)."""

    temperature: jax.Array  # [] f32 (> 0 when do_sample)
    top_k: jax.Array  # [] i32, 0 = off
    top_p: jax.Array  # [] f32, 1.0 = off
    do_sample: jax.Array  # [] bool: False = greedy (argmax)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked, with Hugging Face's meanings.

    do_sample: False = greedy (argmax), whatever the other fields say; True = sample from the filtered distribution;
        None (default) = sample exactly when a temperature > 0 is set (so `SamplingConfig(temperature=0.8)` samples
        and `SamplingConfig()` is greedy).
    temperature: divides the logits before sampling; None = 1.0 when sampling. 0 is greedy (the limit), even with
        do_sample=True.
    top_k: keep the k most likely tokens (0 = off). top_p: keep the smallest set of most likely tokens whose mass
        reaches top_p (1.0 = off; the most likely token always stays). Filters apply in HF's order: temperature,
        top_k, then top_p on what top_k kept.
    """

    temperature: float | None = None
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool | None = None

    def __post_init__(self):
        t = self.temperature
        if t is not None and not (_is_real(t) and 0.0 <= t < math.inf):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (_is_real(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1] (1 = off), got {self.top_p!r}")
        if self.do_sample is not None and not isinstance(self.do_sample, bool | np.bool_):
            raise ValueError(f"do_sample must be True, False or None, got {self.do_sample!r}")

    @property
    def samples(self) -> bool:
        """Whether tokens are sampled (else greedy)."""
        want = self.do_sample if self.do_sample is not None else (self.temperature or 0.0) > 0.0
        return bool(want) and self.effective_temperature > 0.0

    @property
    def effective_temperature(self) -> float:
        return 1.0 if self.temperature is None else float(self.temperature)

    def params(self) -> SamplingParams:
        """The traced form (numpy scalars of fixed dtypes, so every config shares one compiled program)."""
        return SamplingParams(
            np.float32(self.effective_temperature if self.samples else 1.0), np.int32(self.top_k),
            np.float32(self.top_p), np.bool_(self.samples),
        )  # fmt: skip


class GenerateOutput(NamedTuple):
    # [B, max_new_tokens] int32; positions after EOS / a stop string (or past the row's end) hold pad_id. With
    # echo=True: [B, longest prompt + max_new_tokens], each row its prompt followed by its generated tokens.
    tokens: np.ndarray
    lengths: np.ndarray  # [B] generated tokens per row (including the EOS token or stop string that ended it)
    text: list[str] | None  # decoded rows when a tokenizer was given (the prompt too with echo=True)
    logprobs: np.ndarray | None = None  # [B, max_new_tokens] fp32 with return_logprobs=True (0 past a row's end)
    prompt_lengths: np.ndarray | None = None  # [B] prompt tokens per row


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def cache_bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest multiple of max(minimum, bucket(n) / 32) that is >= n: a cache of at most ~6 % more than needed
    (a power-of-two bucket of a 131,072-token prompt + 64 new tokens would double a whole KV cache), in steps of
    a power of two, so kernels that split the cache in power-of-two blocks still tile it."""
    step = max(minimum, bucket(n, 1) // 32)
    return -(-max(n, minimum) // step) * step


def _sample_filtered(logits: jax.Array, key: jax.Array, p: SamplingParams) -> jax.Array:
    """Temperature, top_k and top_p on one descending sort of the logits, then a categorical draw."""
    v = logits.shape[-1]
    scaled = logits / p.temperature
    desc = jnp.sort(scaled, axis=-1)[:, ::-1]
    rank = jnp.arange(v)
    in_k = rank < jnp.where(p.top_k > 0, jnp.minimum(p.top_k, v), v)
    probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    keep = in_k & ((before < p.top_p) | (p.top_p >= 1.0) | (rank == 0))
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jax.random.categorical(key, jnp.where(scaled < cutoff, -jnp.inf, scaled), axis=-1).astype(jnp.int32)


def sample_token(logits: jax.Array, key: jax.Array, sampling: SamplingConfig | SamplingParams) -> jax.Array:
    """logits [B, V] fp32 -> tokens [B] int32.

    A `SamplingConfig` that is greedy compiles to a plain argmax; otherwise (and always for traced `SamplingParams`)
    a `lax.cond` on do_sample picks the argmax or the filtered draw at run time.
    """
    greedy = lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32)  # noqa: E731
    if isinstance(sampling, SamplingConfig):
        if not sampling.samples:
            return greedy()
        sampling = sampling.params()
    p = SamplingParams(*(jnp.asarray(x) for x in sampling))
    return jax.lax.cond(p.do_sample, lambda: _sample_filtered(logits, key, p), greedy)


def _chosen_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log_softmax of the raw fp32 logits [B, V] at tokens [B]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "hash_graphdef",
        "out_len",
        "retrieval_cfg",
        "prefill_cfg",
        "chunk",
        "pad_id",
        "stream",
        "logprobs",
    ),  # fmt: skip
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
    eos_ids: jax.Array,  # [E] (-1 = none)
    key: jax.Array,
    cache: KVCache,
    stream_id: jax.Array,  # [] int32 traced: which registered streamer receives the tokens (with stream=True)
    sampling: SamplingParams,  # traced scalars
    stop_ids: jax.Array,  # [N, L] stop strings' tokens, right-aligned (-1 before them)
    stop_lens: jax.Array,  # [N] tokens per stop string (0 = an unused slot)
    *,
    out_len: int,
    retrieval_cfg: RetrievalConfig,
    prefill_cfg: PrefillConfig,
    chunk: int,
    pad_id: int,
    stream: bool = False,
    logprobs: bool = False,  # static: a program without the log_softmax unless asked (it costs compile time)
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
        run, logits, cache, prompt_lengths, max_new_tokens, eos_ids, key, out_len=out_len, sampling=sampling,
        pad_id=pad_id, emit=emit, stop_ids=stop_ids, stop_lens=stop_lens, with_logprobs=logprobs,
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


def decode_loop(
    run, logits, cache, lengths, max_new_tokens, eos_ids, key, *, out_len, sampling, pad_id, emit=None,
    stop_ids=None, stop_lens=None, with_logprobs=False,
):  # fmt: skip
    """The decode `while_loop` after a prefill: sample from `logits` [B, V], feed back, stop on EOS / stop string /
    budget.

    `run` is the model call with retrieval settings bound; `sampling` a `SamplingConfig` (static: a greedy one
    compiles to an argmax) or traced `SamplingParams`; `emit(i, tokens [B])`, if given, receives each step's tokens
    as they are produced (pad_id for finished rows). `stop_ids` [N, L] (right-aligned, `stop_lens` [N] long, 0 =
    unused) end a row once its last generated tokens equal one of them. Returns (tokens [B, out_len], generated
    lengths [B]) and, with `with_logprobs`, the chosen tokens' log-probabilities [B, out_len] (0 past a row's end).
    """
    b = logits.shape[0]
    use_stops = stop_ids is not None
    if use_stops:
        width = stop_ids.shape[1]
        stop_valid = jnp.arange(width)[None, :] >= (width - stop_lens)[:, None]  # [N, L]

    def cond(carry):
        i, _, done, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        # Sampling happens once per step, here (also for the prefill's logits), so the program holds one copy of it.
        i, logits, done, gen_len, window, lengths, cache, out, out_lp, key = carry
        key, sub = jax.random.split(key)
        tok = sample_token(logits, sub, sampling)
        out = out.at[:, i].set(jnp.where(done, pad_id, tok))
        if with_logprobs:
            out_lp = out_lp.at[:, i].set(jnp.where(done, 0.0, _chosen_logprobs(logits, tok)))
        if emit is not None:
            emit(i, jnp.where(done, pad_id, tok))
        hit = jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
        if use_stops:
            window = jnp.concatenate([window[:, 1:], tok[:, None]], axis=1)  # the row's last L generated tokens
            same = (window[:, None, :] == stop_ids[None]) | ~stop_valid[None]  # [B, N, L]
            hit |= jnp.any(jnp.all(same, axis=-1) & (stop_lens > 0)[None], axis=-1)
        gen_len = jnp.where(hit & ~done, i + 1, gen_len)
        done = done | hit
        # The new token sits at position `lengths`; afterwards each row holds lengths + 1 live tokens.
        step = run(tok[:, None], positions=lengths[:, None], cache=cache, lengths=lengths + 1)
        nxt = step.logits[:, 0].astype(logits.dtype)
        return i + 1, nxt, done, gen_len, window, lengths + 1, step.cache, out, out_lp, key

    out = jnp.full((b, out_len), pad_id, jnp.int32)
    out_lp = jnp.zeros((b, out_len) if with_logprobs else (b, 1), jnp.float32)
    window = jnp.full((b, stop_ids.shape[1] if use_stops else 1), -1, jnp.int32)
    gen_len = jnp.full((b,), max_new_tokens, jnp.int32)
    carry = (jnp.int32(0), logits, jnp.zeros((b,), bool), gen_len, window, lengths, cache, out, out_lp, key)
    carry = jax.lax.while_loop(cond, body, carry)
    gen_len, out, out_lp = carry[3], carry[7], carry[8]
    return (out, gen_len, out_lp) if with_logprobs else (out, gen_len)


# ---------------------------------------------------------------------------------------------------------------------
# Host-side preparation of one call's inputs.


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text))


def _as_token_lists(prompts, tokenizer) -> list[list[int]]:
    if isinstance(prompts, str) or (
        isinstance(prompts, Sequence | np.ndarray)
        and len(prompts)
        and isinstance(prompts[0], numbers.Number | np.bool_)
        and not (isinstance(prompts, np.ndarray) and prompts.ndim > 1)
    ):
        prompts = [prompts]
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("string prompts need a tokenizer: generate(model, prompts, tokenizer=tok)")
            rows.append(_encode(tokenizer, p))
            continue
        arr = np.asarray(p)
        if arr.dtype.kind not in "iu" and arr.size:
            raise ValueError(f"prompt {i} must be text or integer token ids, got {arr.dtype} values")
        rows.append([int(t) for t in arr.reshape(-1)])
    if not rows:
        raise ValueError("generate() got no prompts")
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    return rows


def _conversations(messages) -> list[list[Mapping]]:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError('messages must be a list of {"role": ..., "content": ...} dicts (or a list of such lists)')
    convs = [messages] if isinstance(messages[0], Mapping) else list(messages)
    for c in convs:
        if isinstance(c, str) or not isinstance(c, Sequence) or not c or not all(isinstance(m, Mapping) for m in c):
            raise ValueError('each conversation must be a non-empty list of {"role": ..., "content": ...} dicts')
    return convs


def _chat_rows(messages, tokenizer) -> list[list[int]]:
    """Prompt tokens of each conversation: the tokenizer's chat template with the assistant turn opened."""
    if tokenizer is None:
        raise ValueError("messages= needs a tokenizer with a chat template: generate(model, messages=m, tokenizer=tok)")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: pass the prompt as text or tokens instead of messages=")
    rows = []
    for conv in _conversations(messages):
        text = tokenizer.apply_chat_template(list(conv), add_generation_prompt=True, tokenize=False)
        rows.append(list(tokenizer.encode(text, add_special_tokens=False)))  # the template has its special tokens
    return rows


def _eos_list(eos_token_id, eos_token_ids, cfg, tokenizer) -> list[int]:
    if eos_token_id is not None and eos_token_ids is not None:
        raise ValueError("pass eos_token_id or its alias eos_token_ids, not both")
    given = eos_token_id if eos_token_id is not None else eos_token_ids
    if given is None:
        eos = set(cfg.eos_token_ids)
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        return sorted(eos)
    given = [given] if _is_int(given) else given
    if isinstance(given, str) or not isinstance(given, Sequence | np.ndarray) or not all(_is_int(t) for t in given):
        raise ValueError(f"eos_token_id must be an integer token id or a list of them, got {given!r}")
    return [int(t) for t in given]


def _stop_list(stop_strings) -> list[str]:
    if stop_strings is None:
        return []
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop_strings must be a non-empty string or a list of them, got {stop_strings!r}")
    return stops


def _stop_arrays(stops: list[str], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """[N, L] right-aligned token ids (-1 before each) and [N] lengths, padded to power-of-two shapes."""
    encoded = [list(tokenizer.encode(s, add_special_tokens=False)) for s in stops]
    encoded = [e for e in encoded if e]
    n = bucket(len(encoded), MIN_STOP_SHAPE[0])
    width = bucket(max((len(e) for e in encoded), default=1), MIN_STOP_SHAPE[1])
    ids = np.full((n, width), -1, np.int32)
    lens = np.zeros((n,), np.int32)
    for i, e in enumerate(encoded):
        ids[i, width - len(e) :] = e
        lens[i] = len(e)
    return ids, lens


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text cut before the stop string that ends first, whether one occurred)."""
    ends = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    if not ends:
        return text, False
    return text[: min(ends)[1]], True


def _key_from(seed, key) -> jax.Array:
    if seed is not None and key is not None:
        raise ValueError("pass seed=int or key=jax.random.key(...), not both")
    if seed is not None:
        if not _is_int(seed):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        return jax.random.key(int(seed))
    if key is None:
        return jax.random.key(0)
    if not isinstance(key, jax.Array):
        raise ValueError(f"key must be a jax.random.key(...), got {type(key).__name__} (pass seed=int for a number)")
    return key


def generate(
    model: CausalLM,
    prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | np.ndarray | None = None,
    *,
    messages: Sequence[Mapping[str, str]] | Sequence[Sequence[Mapping[str, str]]] | None = None,
    max_new_tokens: int = 32,
    tokenizer: Any = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    key: jax.Array | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    eos_token_id: int | Sequence[int] | None = None,
    eos_token_ids: Sequence[int] | None = None,
    stop_strings: str | Sequence[str] | None = None,
    echo: bool = False,
    return_logprobs: bool = False,
    retrieval_cfg: RetrievalConfig = RetrievalConfig(),
    hashes: Any = None,
    max_len: int | None = None,
    pad_id: int = 0,
    prefill_chunk: int | None = None,
    prefill_cfg: PrefillConfig = PrefillConfig(),
    streamer: Any = None,
) -> GenerateOutput:
    """Generate up to `max_new_tokens` per prompt in one jitted program.

    Input: `prompts`, a string, a list of strings (needs `tokenizer`), one token list, or a batch of token lists of
    different lengths; or `messages`, one chat conversation `[{"role": "user", "content": ...}, ...]` or a list of
    them, turned into prompt tokens by the tokenizer's chat template (with the assistant turn opened).

    Sampling, with Hugging Face's meanings (see `SamplingConfig`): `do_sample=False` is greedy whatever the other
    values; `do_sample=True` samples at `temperature` (default 1.0) after the `top_k` / `top_p` filters; with
    do_sample unset, a temperature > 0 turns sampling on. These keywords override the fields of `sampling`. `seed`
    (an int) or `key` (a jax.random key) seeds the draws (default: seed 0). All of them are traced: changing them
    never recompiles.

    Stopping: a row ends at one of `eos_token_id` (an id or a list; `eos_token_ids` is the older alias; default:
    the model's and the tokenizer's EOS ids) or when its last generated tokens are the tokenisation of one of
    `stop_strings` (needs `tokenizer`; each encoded without special tokens). The EOS token or stop string's tokens
    count in `lengths` and stay in `tokens`; `text` is cut before the first stop string found in the decoded text
    (also one that the model spelled with other tokens, which does not end the row early).

    Output (`GenerateOutput`): `tokens` [B, max_new_tokens] (pad_id after a row's end), `lengths` [B] generated
    tokens, `text` (with a tokenizer, special tokens skipped), `prompt_lengths` [B]. `echo=True` puts each prompt
    before its generated tokens in `tokens` ([B, longest prompt + max_new_tokens]) and `text`; `lengths` still counts
    the generated tokens. `return_logprobs=True` fills `logprobs` [B, max_new_tokens]: the log_softmax of the model's
    raw fp32 logits (before temperature and filters) at each chosen token, 0 past a row's end (a static choice: the
    first call with it compiles a program that has the log_softmax).

    Model side: `retrieval_cfg` picks decode attention (dense | oracle | linear | spotlight | quest);
    `linear`/`spotlight` need `hashes` (a `hashing.HashStack`). `max_len` fixes the cache size (default: a
    power-of-two bucket of prompt + new tokens). The prompt is prefilled in chunks of `prefill_chunk` tokens
    (default: `config.default_chunk` for the batch and backend; `prefill_cfg` also picks the chunk attention kernel).

    Streaming: `streamer(i, tokens)`, if given, is called from inside the compiled loop with step i's tokens [B]
    (numpy int32; pad_id once a row has finished) as they are produced; an optional `streamer.on_start()` runs when
    the compiled program starts executing. Without a streamer the program has no callbacks at all.
    """
    cfg = model.cfg
    if messages is not None:
        if prompts is not None:
            raise ValueError("pass prompts or messages, not both")
        rows = _chat_rows(messages, tokenizer)
    elif prompts is None:
        raise ValueError("generate() needs prompts (text or token ids) or messages (a chat conversation)")
    else:
        rows = _as_token_lists(prompts, tokenizer)
    for i, r in enumerate(rows):
        bad = [t for t in r if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    overrides = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    sampling = dataclasses.replace(sampling, **{k: v for k, v in overrides.items() if v is not None})
    key = _key_from(seed, key)
    eos = _eos_list(eos_token_id, eos_token_ids, cfg, tokenizer)
    stops = _stop_list(stop_strings)
    if stops and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to encode them: generate(..., tokenizer=tok)")

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
    retrieval_cfg.check_layers(cfg.num_layers)
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
    eos_arr = np.full((bucket(max(len(eos), 1), MIN_EOS_SLOTS),), -1, np.int32)
    eos_arr[: len(eos)] = eos
    stop_ids, stop_lens = _stop_arrays(stops, tokenizer) if stops else _stop_arrays([], None)

    graphdef, state = nnx.split(model)
    hash_graphdef, hash_state = nnx.split(hashes) if hashes is not None else (None, None)
    cache = init_cache(cfg, len(rows), cache_len, model.dtype, retrieval_cfg)
    stream_id = next(_NEXT_STREAM) if streamer is not None else 0
    if streamer is not None:
        _STREAMERS[stream_id] = streamer
    try:
        out, n_new, *logprobs = _generate_jit(
            graphdef, state, hash_graphdef, hash_state, jnp.asarray(tokens), jnp.asarray(lengths),
            jnp.int32(max_new_tokens), jnp.asarray(eos_arr), key, cache, jnp.int32(stream_id), sampling.params(),
            jnp.asarray(stop_ids), jnp.asarray(stop_lens),
            out_len=out_len, retrieval_cfg=retrieval_cfg, prefill_cfg=prefill_cfg, chunk=chunk, pad_id=pad_id,
            stream=streamer is not None, logprobs=bool(return_logprobs),
        )  # fmt: skip
        out = jax.block_until_ready(out)
    finally:
        _STREAMERS.pop(stream_id, None)
    out = np.asarray(out)[:, :max_new_tokens]
    n_new = np.asarray(n_new)
    text = None
    if tokenizer is not None:
        text = []
        for i, r in enumerate(rows):
            gen = tokenizer.decode(out[i, : n_new[i]].tolist(), skip_special_tokens=True)
            gen = truncate_at_stop(gen, stops)[0]
            text.append(tokenizer.decode(r, skip_special_tokens=True) + gen if echo else gen)
    if echo:
        full = np.full((len(rows), longest + max_new_tokens), pad_id, np.int32)
        for i, r in enumerate(rows):
            full[i, : len(r)] = r
            full[i, len(r) : len(r) + max_new_tokens] = out[i]
        out = full
    lp = np.asarray(logprobs[0])[:, :max_new_tokens] if return_logprobs else None
    return GenerateOutput(out, n_new, text, lp, lengths)


def chat(model: CausalLM, tokenizer: Any, messages, **kw) -> str | list[str]:
    """The assistant's reply to one conversation (`[{"role": "user", "content": "Hi"}]`), or a list of replies to a
    list of conversations. Keywords go to `generate()` (max_new_tokens, temperature, stop_strings, ...)."""
    out = generate(model, messages=messages, tokenizer=tokenizer, **kw)
    return out.text[0] if isinstance(messages[0], Mapping) else out.text


# ---------------------------------------------------------------------------------------------------------------------
# Command line: `python -m spotlight_jax.generate "prompt" ...` (installed as `spotlight-generate`).


class _Printer:
    """A streamer for one row: prints the new suffix of the decoded tokens (holding back an incomplete character or a
    possible start of a stop string), and keeps the timestamps `--stats` reports."""

    def __init__(self, tokenizer, stops: Sequence[str], out=None, show: bool = True):
        self.tokenizer, self.stops, self.out, self.show = tokenizer, list(stops), out or sys.stdout, show
        self.tokens: list[int] = []
        self.printed = ""
        self.stopped = False
        self.start: float | None = None
        self.times: list[float] = []

    def on_start(self):
        self.start = time.perf_counter()

    def __call__(self, i, tokens):
        self.times.append(time.perf_counter())
        if not self.show or self.stopped:
            return
        self.tokens.append(int(tokens[0]))
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        text, self.stopped = truncate_at_stop(text, self.stops)
        if not self.stopped:
            hold = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            text = text[: len(text) - hold]
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next bytes
                text = text[:-1]
        self.write(text)

    def write(self, text: str):
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.out.write(text[len(self.printed) :])
            self.out.flush()
            self.printed = text


CLI_EXAMPLES = """examples:
  spotlight-generate "def fibonacci(n):" --max-new-tokens 64
  spotlight-generate --prompt-file long.txt --method spotlight --hashes runs/hash-smollm2-135m/hashes --stats
  spotlight-generate "Name three prime numbers." --chat --stream --temperature 0.7 --top-p 0.9 --seed 1
"""


def build_parser() -> argparse.ArgumentParser:
    from spotlight_jax import cli

    p = argparse.ArgumentParser(
        prog="spotlight-generate",
        description="Generate text with a model (default: the embedded SmolLM2-135M-Instruct, offline) and dense or "
        "Spotlight decode attention.",
        epilog=CLI_EXAMPLES,
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument("prompt", nargs="?", default=None, help="the prompt text (or use --prompt-file)")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this file ('-' = standard input)")
    cli.add_model_arg(p)
    p.add_argument("--method", choices=METHODS, default="dense", help="decode attention")
    p.add_argument("--hashes", default=None, help="exported hash checkpoint folder (needed by --method spotlight; "
                   "--method linear without it uses a seeded random linear hash)")  # fmt: skip
    p.add_argument("--bits", type=int, default=128, help="code bits of --method linear's random hash (no --hashes)")
    p.add_argument("--keep-ratio", type=float, default=RetrievalConfig.keep_ratio,
                   help="fraction of the cache a sparse method reads")  # fmt: skip
    p.add_argument("--sink-tokens", type=int, default=0, help="first tokens a sparse method always reads")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt as a user message in the tokenizer's chat template (default None: on when "
                   "the tokenizer has a chat template)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="sample among the most likely tokens of this mass (1 = off)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling draws")
    p.add_argument("--stop", nargs="+", default=None, metavar="STR", help="stop when one of these strings is produced")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=False,
                   help="print the tokens as they are produced")  # fmt: skip
    p.add_argument("--stats", action=argparse.BooleanOptionalAction, default=False,
                   help="print time to first token, decode tokens/s and total time (to stderr)")  # fmt: skip
    cli.add_debug_arg(p)
    return p


def _read_prompt(args) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise ValueError("give the prompt as an argument or with --prompt-file, not both")
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            return sys.stdin.read()
        if not os.path.isfile(args.prompt_file):
            raise FileNotFoundError(f"prompt file not found: {args.prompt_file}")
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    if args.prompt is None:
        raise ValueError("no prompt: pass it as an argument or with --prompt-file FILE")
    return args.prompt


def _run(args) -> None:
    # Everything checkable without the model first, so a bad value fails in a moment.
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.sink_tokens < 0:
        raise ValueError(f"--sink-tokens must be >= 0, got {args.sink_tokens}")
    stops = _stop_list(args.stop)
    rcfg = RetrievalConfig(method=args.method, keep_ratio=args.keep_ratio, sink_tokens=args.sink_tokens)
    if args.hashes is not None:
        if args.method not in retrieval.CODE_METHODS:
            raise ValueError(f"--hashes is used by --method spotlight or linear, not {args.method}")
        if not os.path.isdir(args.hashes):
            raise FileNotFoundError(f"hash checkpoint folder not found: {args.hashes}")
    elif args.method == "spotlight":
        raise ValueError("--method spotlight needs --hashes PATH (an export of `python -m spotlight_jax.train`)")
    prompt = _read_prompt(args)

    from spotlight_jax.convert import load_model

    t_load = time.perf_counter()
    model, tokenizer = load_model(args.model)
    t_load = time.perf_counter() - t_load
    hashes = None
    if args.hashes is not None:
        from spotlight_jax.hashing import load_hashes

        hashes = load_hashes(args.hashes, model.cfg)
        rcfg = dataclasses.replace(rcfg, bits=hashes.bits)
    elif args.method == "linear":
        from spotlight_jax.hashing import HashConfig, HashStack

        hashes = HashStack(
            model.cfg, HashConfig(kind="linear", bits=args.bits), dense_layers=rcfg.dense_layers,
            rngs=nnx.Rngs(args.seed),
        )  # fmt: skip
        rcfg = dataclasses.replace(rcfg, bits=args.bits)
    use_chat = args.chat if args.chat is not None else bool(getattr(tokenizer, "chat_template", None))
    source = dict(messages=[{"role": "user", "content": prompt}]) if use_chat else dict(prompts=prompt)

    printer = _Printer(tokenizer, stops, show=args.stream) if (args.stream or args.stats) else None
    t0 = time.perf_counter()
    out = generate(
        model, **source, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
        stop_strings=stops or None, retrieval_cfg=rcfg, hashes=hashes, streamer=printer,
    )  # fmt: skip
    total = time.perf_counter() - t0
    if args.stream:
        printer.write(out.text[0])  # what the stream held back (a partial stop string that never completed)
        sys.stdout.write("\n")
        sys.stdout.flush()
    else:
        print(out.text[0], flush=True)
    if args.stats:
        n = int(out.lengths[0])
        ttft = printer.times[0] - printer.start
        decode_s = printer.times[n - 1] - printer.times[0] if n > 1 else 0.0
        rate = f"{(n - 1) / decode_s:.1f} tokens/s" if decode_s > 0 else "n/a"
        print(
            f"prompt: {int(out.prompt_lengths[0])} tokens | generated: {n} tokens\n"
            f"time to first token: {ttft:.3f} s | decode: {rate} | total: {total:.2f} s "
            f"(compile + dispatch {printer.start - t0:.2f} s; model load {t_load:.2f} s)",
            file=sys.stderr,
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    from spotlight_jax.cli import run_cli

    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args), debug=args.debug)


if __name__ == "__main__":
    from spotlight_jax.generate import main as _main  # the imported module's, not a second copy of its state

    sys.exit(_main())
