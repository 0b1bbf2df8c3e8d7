"""Decode-step attention: which cached rows a query reads, and the attention over them.

One entry point, `decode_attention`, picks the method from a static `RetrievalConfig`:
- dense: every live row;
- oracle: exact top-k of the group-aggregated true attention (the upper bound);
- linear / spotlight: top-k by group-summed Hamming similarity of binary codes (LinearHash / trained SpotlightHash);
- quest: top pages by the page-level min/max key bound (Quest, page size 16).

Legend: B batch, N q-heads, K kv-heads, G group, S cache len, H head_dim, W words.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from spotlight_jax.config import RetrievalConfig

CODE_METHODS = ("linear", "spotlight")


def live_budget(lengths: jax.Array, cfg: RetrievalConfig, k_max: int) -> jax.Array:
    """[B] number of rows a step may read: max(min_keep, ceil(keep_ratio * length)), capped by the buffer."""
    budget = jnp.maximum(cfg.min_keep, jnp.ceil(cfg.keep_ratio * lengths.astype(jnp.float32)).astype(jnp.int32))
    return jnp.minimum(budget, k_max)


def dense_decode_attention(q, k_cache, v_cache, lengths, scale):
    """q [B, N, H], k/v_cache [B, K, S, H], lengths [B] -> [B, N, H] fp32. Rows >= lengths[b] are masked."""
    b, n, h = q.shape
    kh, s = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b, kh, n // kh, h)
    logits = jnp.einsum("bkgh,bksh->bkgs", qg, k_cache, preferred_element_type=jnp.float32) * scale
    live = jnp.arange(s)[None, :] < lengths[:, None]  # [B, S]
    logits = jnp.where(live[:, None, None], logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgs,bksh->bkgh", probs.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    return out.reshape(b, n, h)


def decode_attention(
    q: jax.Array,  # [B, N, H]
    k_cache: jax.Array,  # [B, K, S, H] (already holds this step's key at lengths-1)
    v_cache: jax.Array,  # [B, K, S, H]
    lengths: jax.Array,  # [B] live rows including this step's token
    scale: float,
    *,
    layer: int,
    cfg: RetrievalConfig,
    code_cache: jax.Array | None = None,  # [B, K, S, W] uint32
    hash_module=None,
) -> jax.Array:  # [B, N, H] fp32
    if not cfg.is_sparse_layer(layer):
        return dense_decode_attention(q, k_cache, v_cache, lengths, scale)
    raise NotImplementedError(f"retrieval method {cfg.method!r} lands with the Spotlight decoding issue")


__all__ = ["CODE_METHODS", "decode_attention", "dense_decode_attention", "live_budget", "math"]
