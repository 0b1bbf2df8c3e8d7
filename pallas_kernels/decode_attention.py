"""Dense softmax decode attention over the whole live KV cache (flash-decoding split over S).

Axis legend: B batch, N query heads, K KV heads, G = N / K, GP = G padded to a power of two
(>= 16 for the tensor-core dot), S cache length, H head_dim, C splits of S per (batch, KV head),
BS cache rows per step, BK = B * K rows.

Why a kernel: XLA's two einsums over the [B, K, S, H] cache read it at ~1.3 TB/s on an H100 (cuDNN
reaches 2.8 TB/s on the same bytes). Decode attention is a pure stream of K and V: each row is
read once for all G query heads of its group, so the kernel only has to keep enough contiguous
loads in flight.

Grid (BK, C). Program (r, c) loads the G query heads of row r once, takes the c-th of C equal,
BS-aligned pieces of the row's live range [lo, length) (lo = length - window with a sliding
window, else 0), streams it in steps of BS contiguous rows (fp32 online softmax, one [GP, H] x
[H, BS] and one [GP, BS] x [BS, H] dot per step) and ends with an unnormalised partial o / m / l of
its G heads. The pieces are sized from the row's *traced* length, so a short row (early in
generation, or a ragged batch) is still spread over all C programs, and programs whose piece is
empty load nothing. C is static: about 4 programs per H100
SM at batch 1 (132 SMs), fewer at larger batch, never pieces under a few steps at full length.

Merge of the C partials (``combine``): ``"kernel"`` (default, a second small Pallas launch), ``"atomic"`` (the last
program of a row merges, same launch) or ``"xla"``; with C == 1 the program writes the output directly. The modes,
their memory ordering and the measurements behind the default are in ``_common``'s docstring (``split_k_attention``).

Masking: rows s >= lengths[b], and with ``window`` rows s <= lengths[b] - 1 - window, get no
weight; a row with no live key (lengths[b] == 0) returns zeros. fp32 accumulation; fp32 inputs
use IEEE (not tf32) dots. Output fp32, as ``retrieval.dense_decode_attention`` returns.

Bytes: 2 * B * K * length * H * itemsize of K/V (the live rows only) + q + C partials of
(G * H + 2 * G) * 4 bytes per row, written once and read once by the merge (none with C == 1;
with the two-level atomic merge also C / T group partials of the same size) + the fp32 output.
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
    default_interpret,
    next_pow2,
    online_softmax_step,
    padded_group_queries,
    qkv_row_blocks,
    resolve_implementation,
    softmax_init,
    split_k_attention,
)

NUM_SMS = 132  # H100 SXM
TARGET_PROGRAMS = 4 * NUM_SMS


def _decode_attention_body(
    len_ref,  # [1] int32: live length of this batch row
    q_ref,  # [G, H] query heads of this (batch, KV head)
    k_ref,  # [S, H] cache rows of this (batch, KV head)
    v_ref,  # [S, H]
    *,
    group: int,
    seq_len: int,
    block_s: int,
    num_splits: int,
    scale: float,
    window: int | None,
):
    """Program (row, piece): online softmax over the piece's rows -> unnormalised (o [GP, H], m [GP], l [GP])."""
    q = padded_group_queries(q_ref, group)  # [GP, H]
    h = q.shape[1]

    length = jnp.minimum(len_ref[0], seq_len)
    lo = jnp.int32(0) if window is None else jnp.maximum(length - window, 0)  # first live row
    begin = (lo // block_s) * block_s  # BS-aligned start of the live range
    # This program's piece: C equal BS-aligned pieces of [begin, length) (traced: follows the length).
    chunk = cdiv_traced(cdiv_traced(length - begin, num_splits), block_s) * block_s
    start = begin + pl.program_id(1) * chunk
    hi = jnp.minimum(start + chunk, length)  # rows >= hi are masked
    steps = jnp.maximum(cdiv_traced(hi - start, block_s), 0)  # 0: nothing is loaded
    lane = lax.broadcasted_iota(jnp.int32, (block_s,), 0)

    def body(step, carry):
        off = pl.multiple_of(start + step * block_s, block_s)
        rows = off + lane  # [BS]
        in_piece = jnp.broadcast_to((rows < hi)[:, None], (block_s, h))  # uniform along H: wide loads
        kb = plgpu.load(k_ref.at[pl.ds(off, block_s), :], mask=in_piece, other=0, eviction_policy="evict_first")
        vb = plgpu.load(v_ref.at[pl.ds(off, block_s), :], mask=in_piece, other=0, eviction_policy="evict_first")
        ok = rows < hi
        if window is not None:
            ok &= rows >= lo
        # The scale is applied to the fp32 logits (scaling q first would round it to q's dtype).
        return online_softmax_step(q, kb, vb, ok, carry, scale)

    return lax.fori_loop(0, steps, body, softmax_init(*q.shape))


def default_block_s(head_dim: int, itemsize: int) -> int:
    """Rows per step: 16 KB of K (and of V) per step, 16 ... 128 rows (64 at bf16 H = 128)."""
    return int(min(128, max(16, 16384 // (head_dim * itemsize))))


def default_num_splits(seq_len: int, num_rows: int, block_s: int, target_programs: int = TARGET_PROGRAMS) -> int:
    """Pieces per (batch, KV head): about ``target_programs`` programs in all (4 per H100 SM), but
    at full length no piece under 4 steps (more splits would only grow the partials)."""
    want = cdiv(target_programs, num_rows)
    return int(max(1, min(want, cdiv(seq_len, 4 * block_s))))


@functools.partial(
    jax.jit,
    static_argnames=("scale", "window", "block_s", "num_splits", "combine", "num_warps", "num_stages", "interpret"),
)
def decode_attention_pallas(
    q,  # [B, N, H]
    k_cache,  # [B, K, S, H]
    v_cache,  # [B, K, S, H]
    lengths,  # [B] int32
    *,
    scale: float | None = None,
    window: int | None = None,
    block_s: int | None = None,
    num_splits: int | None = None,
    combine: str = "kernel",
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """Pallas flash-decoding over the live rows of each batch row; returns [B, N, H] fp32.

    ``combine``: "atomic" | "kernel" | "xla", how the C partials are merged (module docstring).
    """
    b, n, h = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    if n % kv:
        raise ValueError(f"query heads {n} not a multiple of KV heads {kv}")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache and v_cache must share a dtype, got {k_cache.dtype} and {v_cache.dtype}")
    q = q.astype(k_cache.dtype)  # the dots run in the cache's dtype (q is tiny; the cache is not copied)
    g, bk = n // kv, b * kv
    if block_s is None:
        block_s = default_block_s(h, k_cache.dtype.itemsize)
    block_s = max(16, next_pow2(block_s))
    if num_splits is None:
        num_splits = default_num_splits(s, bk, block_s)
    num_splits = max(1, min(num_splits, cdiv(s, block_s)))
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
    body = functools.partial(
        _decode_attention_body,
        group=g,
        seq_len=s,
        block_s=block_s,
        num_splits=num_splits,
        scale=scale,
        window=None if window is None else int(window),
    )
    rows, row_specs = qkv_row_blocks(q, k_cache, v_cache)
    out = split_k_attention(
        body,
        (lengths.astype(jnp.int32), *rows),
        [pl.BlockSpec((1,), lambda r, c: (r // kv,)), *row_specs],  # lengths[b] of row r = b * K + k
        grid=(bk, num_splits),
        group=g,
        head_dim=h,
        out_dtype=jnp.float32,
        combine=combine,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="decode_attention",
    )  # [BK, G, H]
    return out.reshape(b, n, h)


@functools.partial(jax.jit, static_argnames=("scale", "window"))
def decode_attention_reference(
    q,  # [B, N, H]
    k_cache,  # [B, K, S, H]
    v_cache,  # [B, K, S, H]
    lengths,  # [B] int32
    scale: float | None = None,
    window: int | None = None,
):
    """Masked fp32 softmax over the live rows (jnp); zeros for a row with no live key."""
    b, n, h = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    qg = q.reshape(b, kv, n // kv, h).astype(jnp.float32)
    logits = jnp.einsum(
        "bkgh,bksh->bkgs", qg, k_cache.astype(jnp.float32), precision=lax.Precision.HIGHEST
    )  # [B, K, G, S]
    pos = jnp.arange(s)[None, :]
    live = pos < lengths[:, None]  # [B, S]
    if window is not None:
        live &= pos > lengths[:, None] - 1 - window
    live = live[:, None, None, :]
    logits = jnp.where(live, logits * scale, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(live, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgs,bksh->bkgh", p, v_cache.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    out = jnp.where(den > 0, out / jnp.where(den > 0, den, 1.0), 0.0)
    return out.reshape(b, n, h)


def decode_attention(
    q,  # [B, N, H]
    k_cache,  # [B, K, S, H]
    v_cache,  # [B, K, S, H]
    lengths,  # [B] int32 live rows per batch row
    scale: float | None = None,
    *,
    window: int | None = None,
    implementation: str | None = None,
    interpret: bool | None = None,
    block_s: int | None = None,
    num_splits: int | None = None,
    combine: str = "kernel",
):
    """Dense decode attention of each query head over the live rows of its KV head -> [B, N, H] fp32.

    GQA: query head j reads KV head j // G. Rows s >= lengths[b] are masked, and with a sliding
    ``window`` also rows s <= lengths[b] - 1 - window; a row with lengths[b] == 0 gives zeros.
    ``implementation``: "pallas" | "xla" | None (Pallas on GPU, the jnp reference elsewhere);
    ``interpret`` defaults to ``$SPOTLIGHT_PALLAS_INTERPRET`` (else True off the GPU). ``block_s``,
    ``num_splits`` (C pieces per row) and ``combine`` ("atomic" | "kernel" | "xla": how the C partials
    are merged) tune the Pallas path.
    """
    if resolve_implementation(implementation) == "xla":
        return decode_attention_reference(q, k_cache, v_cache, lengths, scale, window)
    return decode_attention_pallas(
        q,
        k_cache,
        v_cache,
        lengths,
        scale=None if scale is None else float(scale),
        window=window,
        block_s=block_s,
        num_splits=num_splits,
        combine=combine,
        interpret=default_interpret() if interpret is None else interpret,
    )
