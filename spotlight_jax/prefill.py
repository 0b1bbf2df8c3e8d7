"""Chunked prefill: a prompt enters the preallocated cache `chunk` tokens at a time, inside one jitted program.

Each chunk is one model call (`CausalLM(..., cache_offset=offset)`): it writes the chunk's keys, values and key codes
into the cache at `offset` and attends causally to the cache so far with a fused flash-attention kernel, so a
prefill holds one chunk's activations and one tile of scores per program, never T x S scores. The loop is a
`lax.while_loop` over chunks with a traced trip count, so a short prompt in a long bucket stops early and one
compiled program serves every prompt length of its bucket.

Rows are right-padded and share the chunk offsets. The last chunk is moved back to end at the longest prompt rather
than run past it (a chunk may then redo tokens of the one before: rewriting a key or value of the same token at the
same position changes nothing), so no chunk ever writes past `max(longest prompt, chunk)` positions of the cache.

Legend: B batch, W padded prompt width, C chunk, S cache len, V vocab.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from spotlight_jax.config import PrefillConfig, RetrievalConfig
from spotlight_jax.model import CausalLM, KVCache


def prefill(
    model: CausalLM,
    tokens: jax.Array,  # [B, W] int32 right-padded prompts
    prompt_lengths: jax.Array,  # [B] int32
    cache: KVCache,
    *,
    chunk: int,
    retrieval_cfg: RetrievalConfig = RetrievalConfig(),
    hashes: Any = None,
    prefill_cfg: PrefillConfig = PrefillConfig(),
) -> tuple[jax.Array, KVCache]:
    """Prefill `tokens` into `cache` in chunks of `chunk` -> (logits [B, V] fp32 at each row's last prompt token,
    cache). Needs chunk <= S; rows of one token and prompts shorter than a chunk are fine."""
    b, width = tokens.shape
    if chunk > cache.max_len:
        raise ValueError(f"prefill chunk {chunk} is longer than the cache ({cache.max_len} tokens)")
    if width < chunk:  # one chunk wider than the prompts: pad (the padding is masked by the lengths)
        tokens = jnp.pad(tokens, ((0, 0), (0, chunk - width)))
        width = chunk
    longest = jnp.max(prompt_lengths)
    n_chunks = (longest + chunk - 1) // chunk
    last_offset = jnp.maximum(longest, chunk) - chunk  # the last chunk ends at the longest prompt (or at `chunk`)

    def body(carry):
        i, cache, logits = carry
        offset = jnp.minimum(i * chunk, last_offset).astype(jnp.int32)
        ids = jax.lax.dynamic_slice_in_dim(tokens, offset, chunk, axis=1)  # [B, C]
        live = jnp.clip(prompt_lengths, 0, offset + chunk).astype(jnp.int32)  # keys a chunk may see, per row
        out = model(
            ids, cache=cache, lengths=live, cache_offset=offset, retrieval_cfg=retrieval_cfg, hashes=hashes,
            prefill_cfg=prefill_cfg, logits="last",
        )  # fmt: skip
        # A row's next-token logits come from the chunk holding its last prompt token.
        here = (prompt_lengths - 1 >= offset) & (prompt_lengths - 1 < offset + chunk)  # [B]
        logits = jnp.where(here[:, None], out.logits[:, 0], logits)
        return i + 1, out.cache, logits

    logits = jnp.zeros((b, model.cfg.vocab_size), jnp.float32)
    _, cache, logits = jax.lax.while_loop(lambda c: c[0] < n_chunks, body, (jnp.int32(0), cache, logits))
    return logits, cache
