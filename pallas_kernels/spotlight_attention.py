"""One Spotlight decode step of one layer: Hamming top-k retrieval, then sparse attention.

Axis legend: B batch, N query heads, K KV heads, S cache length, H head_dim, W code words.
The Pallas path hands the selection to the attention kernel as (indices, n_valid) per row, so no
boolean mask is materialised between the two kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import resolve_implementation
from pallas_kernels.hamming_topk import ONE_LAUNCH, hamming_topk_reference, hamming_topk_rows, kernel_budget
from pallas_kernels.sparse_decode_attention import (
    sparse_decode_attention_reference,
    sparse_decode_attention_rows,
)


@functools.partial(jax.jit, static_argnames=("k", "scale"))
def spotlight_attention_reference(q, k_cache, v_cache, q_codes, k_codes, lengths, k: int, budget=None, scale=None):
    sel = hamming_topk_reference(q_codes, k_codes, lengths, k, budget)
    return sparse_decode_attention_reference(q, k_cache, v_cache, sel.indices, sel.valid, scale)


@functools.partial(jax.jit, static_argnames=("k", "scale", "one_launch", "interpret"))
def _spotlight_attention_pallas(
    q, k_cache, v_cache, q_codes, k_codes, lengths, budget, *, k, scale, one_launch, interpret
):
    idx, _, n_valid = hamming_topk_rows(
        q_codes, k_codes, lengths, budget, k=k, one_launch=one_launch, interpret=interpret
    )
    return sparse_decode_attention_rows(q, k_cache, v_cache, idx, n_valid, scale=scale, interpret=interpret)


def spotlight_attention(
    q,  # [B, N, H]
    k_cache,  # [B, K, S, H]
    v_cache,  # [B, K, S, H]
    q_codes,  # [B, N, W] uint32
    k_codes,  # [B, K, S, W] uint32
    lengths,  # [B] int32
    k: int,
    budget=None,  # [B] int32 <= k, or None (= k)
    scale: float | None = None,
    implementation: str | None = None,
    *,
    one_launch: bool | None = ONE_LAUNCH,
    interpret: bool = False,
):
    """Attention of each query head over the top-``budget`` tokens of its KV head -> [B, N, H].

    ``one_launch``: the top-k's launch plan (``hamming_topk_rows``; None = one launch for large grids)."""
    lengths = jnp.asarray(lengths, jnp.int32)
    if resolve_implementation(implementation) == "xla":
        return spotlight_attention_reference(q, k_cache, v_cache, q_codes, k_codes, lengths, k, budget, scale)
    live = kernel_budget(budget, q.shape[0], k)
    return _spotlight_attention_pallas(
        q,
        k_cache,
        v_cache,
        q_codes,
        k_codes,
        lengths,
        live,
        k=k,
        scale=scale,
        one_launch=one_launch,
        interpret=interpret,
    )
