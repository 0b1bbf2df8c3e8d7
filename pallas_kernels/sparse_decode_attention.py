"""Exact softmax decode attention over selected KV rows, gathered inside the kernel.

Axis legend: B batch, N query heads, K KV heads, G = N / K, GP = G padded to a power of two
(>= 16 for the tensor-core dot), S cache length, H head_dim, k selected slots, BT slots per step,
C chunks per row, BK = B * K rows.

One program handles one (batch row, KV head) and one chunk of the selected slots: it gathers the
chunk's K and V rows straight from the cache (``k_ref[idx_vec, :]``, no materialised copy) and runs
an online softmax for the G query heads of the group (flash-decoding split). Each selected row is
read once for all G query heads. fp32 accumulation; fp32 inputs use IEEE (not tf32) dots.

Merge of the C chunks (``combine``): ``"kernel"`` (default, a second small Pallas launch), ``"atomic"`` (the last
program of a row merges, same launch) or ``"xla"``; with C == 1 the program writes the output (q's dtype) directly.
The modes, their memory ordering and the measurements behind the default are in ``_common``'s docstring
(``split_k_attention``).

Bytes: 2 * k * H * itemsize per (row, KV head) of gathered K/V (rows are 256 B in bf16 at
H = 128, so gathers are full-sector reads) + k indices + q + C partials of (G * H + 2 * G) * 4
bytes per row, written once and read once by the merge (none with C == 1; with the two-level atomic
merge also C / T group partials of the same size) + the output.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    cdiv,
    cdiv_traced,
    next_pow2,
    online_softmax_step,
    padded_group_queries,
    prev_pow2,
    qkv_row_blocks,
    resolve_implementation,
    softmax_init,
    split_k_attention,
)


def _sparse_attention_body(
    q_ref,  # [G, H] (block of [B*K, G, H]; rows >= G of the padded tile are masked)
    k_ref,  # [S, H] cache rows of this (batch, KV head)
    v_ref,  # [S, H]
    idx_ref,  # [k] int32 selected slots of this row
    mask_ref,  # [k] int8 validity of the slots, or [1] int32 number of valid leading slots
    *,
    group: int,
    num_slots: int,
    block_t: int,
    chunk: int,
    scale: float,
    count_mask: bool,
):
    """Program (row, chunk): online softmax over the chunk's slots -> unnormalised (o [GP, H], m [GP], l [GP])."""
    q = padded_group_queries(q_ref, group)  # [GP, H]
    q = (q.astype(jnp.float32) * scale).astype(q_ref.dtype)
    chunk_start = pl.program_id(1) * chunk
    n_valid = mask_ref[0] if count_mask else None

    def body(step, carry):
        slots = chunk_start + step * block_t + lax.broadcasted_iota(jnp.int32, (block_t,), 0)
        in_row = slots < num_slots
        safe = jnp.where(in_row, slots, 0)
        idx = plgpu.load(idx_ref.at[safe], mask=in_row, other=0)  # [BT]
        if count_mask:
            ok = slots < n_valid
        else:
            ok = in_row & (plgpu.load(mask_ref.at[safe], mask=in_row, other=0) != 0)
        idx = jnp.where(ok, idx, 0)
        return online_softmax_step(q, k_ref[idx, :], v_ref[idx, :], ok, carry)  # gathered rows [BT, H]

    steps = chunk // block_t
    if count_mask:
        # Skip the steps of this chunk that lie entirely past the valid slots.
        steps = jnp.clip(cdiv_traced(n_valid - chunk_start, block_t), 0, steps)
    return lax.fori_loop(0, steps, body, softmax_init(*q.shape))


def default_chunk(num_slots: int, num_rows: int, block_t: int, target_programs: int = 528) -> int:
    """Slots per program: enough programs (about 4 per H100 SM) without tiny chunks."""
    want = max(1, num_slots * num_rows // target_programs)
    return int(min(max(prev_pow2(want), block_t), max(block_t, next_pow2(num_slots)), 4096))


@functools.partial(
    jax.jit,
    static_argnames=("scale", "block_t", "chunk", "combine", "merge_block_h", "num_warps", "num_stages", "interpret"),
)
def sparse_decode_attention_rows(
    q,  # [B, N, H]
    k_cache,  # [B, K, S, H]
    v_cache,  # [B, K, S, H]
    indices,  # [B*K, k] int32
    mask,  # [B*K, k] int8 validity, or [B*K] int32 count of valid leading slots
    *,
    scale: float | None = None,
    block_t: int = 32,
    chunk: int | None = None,
    combine: str = "kernel",
    merge_block_h: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """Pallas sparse decode attention on row-flattened selections; returns [B, N, H] in q's dtype.

    ``combine``: "atomic" | "kernel" | "xla", how the chunks' partials are merged (module docstring);
    ``merge_block_h``: head_dim columns per program of the "kernel" merge (None: ``_common.merge_block_h``).
    """
    b, n, h = q.shape
    kv = k_cache.shape[1]
    g, bk, num_slots = n // kv, b * kv, indices.shape[1]
    block_t = min(block_t, max(16, next_pow2(num_slots)))
    if chunk is None:
        chunk = default_chunk(num_slots, bk, block_t)
    chunk = max(chunk, block_t)
    num_chunks = cdiv(num_slots, chunk)
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
    count_mask = mask.ndim == 1
    body = functools.partial(
        _sparse_attention_body,
        group=g,
        num_slots=num_slots,
        block_t=block_t,
        chunk=chunk,
        scale=scale,
        count_mask=count_mask,
    )
    mask_spec = (
        pl.BlockSpec((1,), lambda r, c: (r,)) if count_mask else pl.BlockSpec((None, num_slots), lambda r, c: (r, 0))
    )
    rows, row_specs = qkv_row_blocks(q, k_cache, v_cache)
    out = split_k_attention(
        body,
        (*rows, indices, mask),
        [*row_specs, pl.BlockSpec((None, num_slots), lambda r, c: (r, 0)), mask_spec],
        grid=(bk, num_chunks),
        group=g,
        head_dim=h,
        out_dtype=q.dtype,
        combine=combine,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="sparse_decode_attention",
        merge_block_h=merge_block_h,
    )  # [BK, G, H]
    return out.reshape(b, n, h)


@functools.partial(jax.jit, static_argnames=("scale",))
def sparse_decode_attention_reference(
    q,  # [B, N, H]
    k_cache,  # [B, K, S, H]
    v_cache,  # [B, K, S, H]
    indices,  # [B, K, k] int32
    valid,  # [B, K, k] bool
    scale: float | None = None,
):
    """Gathers the selected rows (XLA) and runs a masked fp32 softmax; zeros for empty heads."""
    b, n, h = q.shape
    kv = k_cache.shape[1]
    g = n // kv
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    ks = jnp.take_along_axis(k_cache, indices[..., None], axis=2).astype(jnp.float32)  # [B, K, k, H]
    vs = jnp.take_along_axis(v_cache, indices[..., None], axis=2).astype(jnp.float32)
    qg = q.reshape(b, kv, g, h).astype(jnp.float32) * scale
    logits = jnp.einsum("bkgh,bkth->bkgt", qg, ks, precision=lax.Precision.HIGHEST)
    logits = jnp.where(valid[:, :, None, :], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(valid[:, :, None, :], jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgt,bkth->bkgh", p, vs, precision=lax.Precision.HIGHEST)
    out = jnp.where(den > 0, out / jnp.where(den > 0, den, 1.0), 0.0)
    return out.reshape(b, n, h).astype(q.dtype)


def sparse_decode_attention(
    q,  # [B, N, H]
    k_cache,  # [B, K, S, H]
    v_cache,  # [B, K, S, H]
    indices,  # [B, K, k] int32, in [0, S)
    valid,  # [B, K, k] bool
    scale: float | None = None,
    *,
    implementation: str | None = None,
    interpret: bool = False,
    block_t: int = 32,
    chunk: int | None = None,
    combine: str = "kernel",
):
    """Softmax attention of each query head over the valid selected rows of its KV head.

    Output in q's dtype, fp32 accumulation; heads with no valid slot get zeros. ``chunk`` (selected slots
    per program) and ``combine`` ("atomic" | "kernel" | "xla": how the chunks are merged) tune the Pallas path.
    """
    if resolve_implementation(implementation) == "xla":
        return sparse_decode_attention_reference(q, k_cache, v_cache, indices, valid, scale)
    b, kv, k = indices.shape
    valid = jnp.broadcast_to(valid, indices.shape)
    return sparse_decode_attention_rows(
        q,
        k_cache,
        v_cache,
        indices.reshape(b * kv, k).astype(jnp.int32),
        valid.reshape(b * kv, k).astype(jnp.int8),
        scale=scale,
        block_t=block_t,
        chunk=chunk,
        combine=combine,
        interpret=interpret,
    )


def dense_decode_attention_reference(
    q,  # [B, N, H]
    k_cache,  # [B, K, S, H]
    v_cache,  # [B, K, S, H]
    lengths,  # [B] int32
    scale: float | None = None,
):
    """Dense masked decode attention (fp32) over the first ``lengths[b]`` rows: test oracle."""
    b, kv, s, _ = k_cache.shape
    idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, kv, s))
    valid = idx < lengths[:, None, None]
    return sparse_decode_attention_reference(q, k_cache, v_cache, idx, valid, scale)
