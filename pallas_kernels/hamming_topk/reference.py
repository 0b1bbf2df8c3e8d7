"""Plain-``jnp`` references of the Hamming scores and the exact top-k (``lax.top_k`` on masked scores).

Axis legend: B batch, N query heads, K KV heads, G = N / K, S cache length, W = bits / 32 words.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class TopK(NamedTuple):
    indices: jax.Array  # [B, K, k] int32, 0 in invalid slots
    scores: jax.Array  # [B, K, k] int32, 0 in invalid slots
    valid: jax.Array  # [B, K, k] bool


@jax.jit
def hamming_scores_reference(
    q_codes,  # [B, N, W] uint32
    k_codes,  # [B, K, S, W] uint32
):
    """int32 [B, K, S]: sum over the G query heads of each KV head of XNOR-popcounts."""
    b, n, w = q_codes.shape
    kv = k_codes.shape[1]
    q = q_codes.reshape(b, kv, n // kv, 1, w)  # [B, K, G, 1, W]
    x = ~(q ^ k_codes[:, :, None])  # [B, K, G, S, W]
    return jnp.sum(lax.population_count(x).astype(jnp.int32), axis=(2, 4))


def kernel_budget(budget, b: int, k: int):
    """[B] int32 budget for the Pallas top-k, which clamps it to ``k`` itself (no separate XLA ``minimum``)."""
    return jnp.full((b,), k, jnp.int32) if budget is None else jnp.asarray(budget, jnp.int32)


def _live_budget(budget, b, k):
    """[B] int32 budget clamped to ``k`` (the reference's)."""
    return jnp.minimum(kernel_budget(budget, b, k), k)


@functools.partial(jax.jit, static_argnames=("k",))
def hamming_topk_reference(
    q_codes,  # [B, N, W] uint32
    k_codes,  # [B, K, S, W] uint32
    lengths,  # [B] int32
    k: int,
    budget=None,  # [B] int32 <= k, or None
) -> TopK:
    """Exact reference with ``lax.top_k`` on masked scores."""
    b, kv, s, _ = k_codes.shape
    scores = hamming_scores_reference(q_codes, k_codes)
    live = jnp.arange(s)[None, None, :] < lengths[:, None, None]
    masked = jnp.where(live, scores, -1)
    if k > s:
        masked = jnp.pad(masked, ((0, 0), (0, 0), (0, k - s)), constant_values=-1)
    vals, idx = lax.top_k(masked, k)
    n_valid = jnp.minimum(_live_budget(budget, b, k), lengths)  # [B]
    valid = jnp.broadcast_to(jnp.arange(k)[None, None, :] < n_valid[:, None, None], vals.shape)
    return TopK(jnp.where(valid, idx, 0).astype(jnp.int32), jnp.where(valid, vals, 0), valid)
