"""Fused causal flash attention of one prefill chunk against the KV cache (Pallas Triton kernel + blocked XLA path).

Axis legend: B batch, T query len (the chunk), S kv len (the cache), N q-heads, K kv-heads, G = N / K group, H head_dim,
BQ queries per program (``block_q``), BK keys per step (``block_k``), NQ = ceil(T / BQ) query blocks.

Semantics. Query t of row b sits at absolute position p = offset + t (``offset`` is the same for every row and may be
traced) and attends to the keys s with s <= p, s < lengths[b] and, with a sliding ``window`` (HF Mistral convention),
s > p - window. Query head n reads KV head n // G (the cache is indexed, never repeated). A query with no visible key
(lengths[b] == 0, or a window that ends before lengths[b]) returns zeros. fp32 online softmax, fp32 output. q is cast
to the cache's dtype (bf16 in practice) so that both dots run on tensor cores with fp32 accumulation; fp32 inputs use
IEEE fp32 dots (no tf32), which is what the tests compare.

Pallas kernel (``implementation="pallas"``). Grid (B * N, NQ): program (r, i) owns query head n = r % N of row
b = r // N and one [BQ, H] query tile; its K / V refs are the whole [S, H] rows of KV head n // G. Axis 0 (the heads)
is the fastest-launched one, so the G heads that share a KV head run side by side and stream the same K / V blocks
(L2 hits). Query blocks run in reverse order (i = NQ - 1 first): in a causal prefill the last query blocks see the
most keys, and starting the longest programs first shortens the tail of the launch. Each program walks only the key
blocks that some of its queries can see, in three loops over the key-block index j:

- [j_lo, mid_lo) masked: the window's left edge (only with a window);
- [mid_lo, mid_hi) unmasked: blocks that every query of the tile sees whole (j * BK + BK <= min(first_pos + 1,
  length) and, with a window, j * BK > last_pos - window): plain loads, no mask arithmetic. For a chunk deep in the
  cache this is nearly every block;
- [mid_hi, j_hi) masked: the causal diagonal and the block holding lengths[b] (loads masked to s < hi, so the cache
  past the live rows is never read and a non-multiple S is safe).

Blocks wholly above the diagonal, past lengths[b] or left of the window are never loaded. The loop bounds come from
the traced ``offset`` and lengths[b], so one compiled kernel serves every chunk position. The softmax runs in base 2
(logits scaled by scale * log2(e) in fp32, ``exp2``: one FMA + ex2 per logit). Masked logits get a finite -1e30, so
no NaN appears when a query has seen nothing yet; a query that never sees a key ends with m == -1e30 and is written
as zeros. T need not divide BQ (masked query loads / output stores) and S need not divide BK.

Tiling (``default_tiling``): bf16 H = 128 uses BQ 128, BK 128, 8 warps, 2 stages, the configuration of jax's own
Pallas flash attention and of the Triton tutorial's Hopper configs (8 warps want a 128 x 128 tile): two warpgroups
of 64 query rows each, fp32 accumulator [128, 128] = 64 registers per thread, K + V stages 2 x 64 KB of shared
memory beside the 32 KB query tile (3 stages would need 224 KB, at the H100's 227 KB limit). fp32 inputs use
smaller tiles (BQ 64, BK 32, 4 warps): IEEE fp32 dots run on the FMA units and fp32 tiles take twice the bytes. The
Pallas path needs H a power of two >= 16 (Triton's dot tile); the XLA path takes any H.

XLA path (``implementation="xla"``, the default off the GPU). A ``lax.fori_loop`` over key blocks of ``block_k``
(default 512) with the same online softmax; queries grouped as [B, K, G, T, H] (no K / V repeat). Memory per step
is O(B * N * T * BK), never T x S. It visits the key blocks [j_lo, ceil(min(offset + T, max lengths, S) / BK)) (a
traced trip count), where j_lo is the block of the first key the window reaches (0 without a window); every visited
block is fully masked (it is not meant to be fast, only bounded in memory and exact). A last block that would run
past S is slid back to end at S, and the keys it repeats are masked.

``flash_attention_reference`` materialises the [B, N, T, S] scores in fp32 (tests only).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    NEG,
    cdiv,
    cdiv_traced,
    default_interpret,
    next_pow2,
    prev_pow2,
    resolve_implementation,
    triton_params,
)

LOG2E = math.log2(math.e)
XLA_BLOCK_K = 512
MIN_BLOCK = 16  # Triton's smallest dot tile


def default_tiling(head_dim: int, itemsize: int) -> tuple[int, int, int, int]:
    """(block_q, block_k, num_warps, num_stages) of the Pallas kernel for a head_dim and input itemsize."""
    if itemsize >= 4:  # fp32: IEEE dots on the FMA units, twice the bytes per tile
        return 64, 32, 4, 2
    if head_dim <= 64:
        return 128, 128, 4, 3
    if head_dim <= 128:
        return 128, 128, 8, 2
    return 64, 64, 8, 2


def _dot_precision(dtype):
    """IEEE fp32 dots for fp32 inputs (no tf32); the default (tensor cores, fp32 accumulation) otherwise."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# ------------------------------------------------------------------------------------------------
# Pallas Triton kernel


def _flash_kernel(
    off_ref,  # [1] int32: offset, the absolute position of query 0
    len_ref,  # [1] int32: lengths[b] of this program's row
    q_ref,  # [T, H] queries of head n of row b
    k_ref,  # [S, H] keys of KV head n // G of row b
    v_ref,  # [S, H] values of KV head n // G of row b
    o_ref,  # [T, H] fp32 output of head n of row b
    *,
    seq_q: int,
    seq_kv: int,
    num_q_blocks: int,
    block_q: int,
    block_k: int,
    scale: float,
    window: int | None,
    precision,
):
    qi = num_q_blocks - 1 - pl.program_id(1)  # the longest (last) query blocks start first
    q0 = pl.multiple_of(qi * block_q, block_q)
    t = q0 + lax.broadcasted_iota(jnp.int32, (block_q,), 0)  # [BQ] query indices
    ragged_q = seq_q % block_q != 0
    if ragged_q:
        q = plgpu.load(q_ref.at[pl.ds(q0, block_q), :], mask=(t < seq_q)[:, None], other=0)  # [BQ, H]
    else:
        q = q_ref[pl.ds(q0, block_q), :]  # [BQ, H]
    h = q.shape[1]

    offset = off_ref[0]
    length = jnp.clip(len_ref[0], 0, seq_kv)
    pos = offset + t  # [BQ] absolute positions
    first_pos = offset + q0
    last_pos = offset + jnp.minimum(q0 + block_q, seq_q) - 1  # of the last real query of the tile
    hi = jnp.maximum(jnp.minimum(length, last_pos + 1), 0)  # keys [lo, hi) may be visible to some query
    lo = jnp.int32(0) if window is None else jnp.maximum(first_pos - window + 1, 0)
    j_lo = lo // block_k
    j_hi = jnp.maximum(cdiv_traced(hi, block_k), j_lo)
    # Blocks that every query of the tile sees whole: causal / length up to full_hi, window from full_lo.
    full_hi = jnp.maximum(jnp.minimum(first_pos + 1, length), 0) // block_k
    full_lo = jnp.int32(0) if window is None else cdiv_traced(jnp.maximum(last_pos - window + 1, 0), block_k)
    mid_lo = jnp.clip(full_lo, j_lo, j_hi)
    mid_hi = jnp.clip(full_hi, mid_lo, j_hi)

    c = scale * LOG2E  # base-2 softmax of the fp32 logits
    lane = lax.broadcasted_iota(jnp.int32, (block_k,), 0)

    def qk(kb):  # [BQ, H] x [BK, H]^T -> [BQ, BK] fp32
        return lax.dot_general(q, kb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision)

    def update(logits, m_blk, vb, carry):  # logits [BQ, BK] base-2, m_blk [BQ] their row max
        acc, m, l_sum = carry  # [BQ, H], [BQ], [BQ]
        m_new = jnp.maximum(m, m_blk)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(logits - m_new[:, None])  # [BQ, BK]
        pv = lax.dot_general(
            p.astype(vb.dtype), vb, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        )  # [BQ, H]
        return alpha[:, None] * acc + pv, m_new, alpha * l_sum + jnp.sum(p, axis=1)

    def unmasked(j, carry):
        k0 = pl.multiple_of(j * block_k, block_k)
        kb = k_ref[pl.ds(k0, block_k), :]  # [BK, H]
        vb = v_ref[pl.ds(k0, block_k), :]  # [BK, H]
        logits = qk(kb) * c
        return update(logits, jnp.max(logits, axis=1), vb, carry)

    def masked(j, carry):
        k0 = pl.multiple_of(j * block_k, block_k)
        cols = k0 + lane  # [BK] key positions
        live = cols < hi  # rows past the live range are not read (zeros)
        live2 = jnp.broadcast_to(live[:, None], (block_k, h))  # uniform along H: wide loads
        kb = plgpu.load(k_ref.at[pl.ds(k0, block_k), :], mask=live2, other=0)  # [BK, H]
        vb = plgpu.load(v_ref.at[pl.ds(k0, block_k), :], mask=live2, other=0)  # [BK, H]
        ok = (cols[None, :] <= pos[:, None]) & live[None, :]  # [BQ, BK]
        if window is not None:
            ok &= cols[None, :] > pos[:, None] - window
        logits = jnp.where(ok, qk(kb) * c, NEG)
        return update(logits, jnp.max(logits, axis=1), vb, carry)

    carry = (
        jnp.zeros((block_q, h), jnp.float32),
        jnp.full((block_q,), NEG, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    if window is not None:
        carry = lax.fori_loop(j_lo, mid_lo, masked, carry)
    carry = lax.fori_loop(mid_lo, mid_hi, unmasked, carry)
    acc, m, l_sum = lax.fori_loop(mid_hi, j_hi, masked, carry)
    seen = m > 0.5 * NEG  # at least one visible key (then l >= 1)
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l_sum, 1.0), 0.0)
    out = acc * inv[:, None]  # [BQ, H]
    if ragged_q:
        plgpu.store(o_ref.at[pl.ds(q0, block_q), :], out, mask=(t < seq_q)[:, None])
    else:
        plgpu.store(o_ref.at[pl.ds(q0, block_q), :], out)  # (``o_ref[...] = out`` would also load the old tile)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "window", "block_q", "block_k", "num_warps", "num_stages", "interpret"),
)
def flash_attention_pallas(
    q,  # [B, N, T, H]
    k_cache,  # [B, K, S, H]
    v_cache,  # [B, K, S, H]
    offset,  # [1] int32
    lengths,  # [B] int32
    *,
    scale: float,
    window: int | None,
    block_q: int,
    block_k: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
):
    """The Pallas Triton kernel (module docstring); inputs already validated -> [B, N, T, H] fp32."""
    b, n, t, h = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    g = n // kv
    q = q.astype(k_cache.dtype)
    nq = cdiv(t, block_q)
    kernel = functools.partial(
        _flash_kernel,
        seq_q=t,
        seq_kv=s,
        num_q_blocks=nq,
        block_q=block_q,
        block_k=block_k,
        scale=scale,
        window=window,
        precision=_dot_precision(k_cache.dtype),
    )
    head_spec = pl.BlockSpec((None, None, t, h), lambda r, i: (r // n, r % n, 0, 0))
    kv_spec = pl.BlockSpec((None, None, s, h), lambda r, i: (r // n, (r % n) // g, 0, 0))
    return pl.pallas_call(
        kernel,
        grid=(b * n, nq),
        in_specs=[
            pl.BlockSpec((1,), lambda r, i: (0,)),  # offset
            pl.BlockSpec((1,), lambda r, i: (r // n,)),  # lengths[b] of row r = b * N + n
            head_spec,
            kv_spec,
            kv_spec,
        ],
        out_specs=head_spec,
        out_shape=jax.ShapeDtypeStruct((b, n, t, h), jnp.float32),
        compiler_params=triton_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="flash_attention",
    )(offset, lengths, q, k_cache, v_cache)


# ------------------------------------------------------------------------------------------------
# Blocked XLA path and the reference


@functools.partial(jax.jit, static_argnames=("scale", "window", "block_k"))
def flash_attention_xla(
    q,  # [B, N, T, H]
    k_cache,  # [B, K, S, H]
    v_cache,  # [B, K, S, H]
    offset,  # [1] int32
    lengths,  # [B] int32
    *,
    scale: float,
    window: int | None,
    block_k: int,
):
    """Online softmax over the visible key blocks in a ``fori_loop`` (module docstring) -> [B, N, T, H] fp32."""
    b, n, t, h = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    g = n // kv
    bk = min(block_k, s)
    precision = _dot_precision(k_cache.dtype)
    qg = q.astype(k_cache.dtype).reshape(b, kv, g, t, h)  # [B, K, G, T, H]
    off = offset.reshape(()).astype(jnp.int32)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, s)
    pos = off + jnp.arange(t, dtype=jnp.int32)  # [T]
    hi = jnp.maximum(jnp.minimum(jnp.minimum(jnp.max(lengths), off + t), s), 0)
    lo = jnp.int32(0) if window is None else jnp.maximum(off - window + 1, 0)
    j_lo = lo // bk
    j_hi = jnp.maximum(cdiv_traced(hi, bk), j_lo)

    def body(j, carry):
        acc, m, l_sum = carry  # [B, K, G, T, H], [B, K, G, T], [B, K, G, T]
        start = j * bk
        at = jnp.minimum(start, s - bk)  # a block past S slides back; its repeated keys are masked
        kb = lax.dynamic_slice_in_dim(k_cache, at, bk, axis=2)  # [B, K, BK, H]
        vb = lax.dynamic_slice_in_dim(v_cache, at, bk, axis=2)
        cols = at + jnp.arange(bk, dtype=jnp.int32)  # [BK]
        live = (cols >= start)[None, :] & (cols[None, :] < lengths[:, None])  # [B, BK]
        vb = jnp.where(live[:, None, :, None], vb, 0)  # whatever sits past the live rows never reaches the sum
        ok = live[:, None, :] & (cols[None, None, :] <= pos[None, :, None])  # [B, T, BK]
        if window is not None:
            ok &= cols[None, None, :] > pos[None, :, None] - window
        ok = ok[:, None, None]  # [B, 1, 1, T, BK]
        logits = jnp.einsum("bkgth,bksh->bkgts", qg, kb, preferred_element_type=jnp.float32, precision=precision)
        logits = jnp.where(ok, logits * scale, NEG)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(ok, jnp.exp(logits - m_new[..., None]), 0.0)  # [B, K, G, T, BK]
        pv = jnp.einsum(
            "bkgts,bksh->bkgth", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32, precision=precision
        )
        return alpha[..., None] * acc + pv, m_new, alpha * l_sum + jnp.sum(p, axis=-1)

    init = (
        jnp.zeros((b, kv, g, t, h), jnp.float32),
        jnp.full((b, kv, g, t), NEG, jnp.float32),
        jnp.zeros((b, kv, g, t), jnp.float32),
    )
    acc, _, l_sum = lax.fori_loop(j_lo, j_hi, body, init)
    out = jnp.where(l_sum[..., None] > 0, acc / jnp.where(l_sum > 0, l_sum, 1.0)[..., None], 0.0)
    return out.reshape(b, n, t, h)


@functools.partial(jax.jit, static_argnames=("scale", "window"))
def flash_attention_reference(
    q,  # [B, N, T, H]
    k_cache,  # [B, K, S, H]
    v_cache,  # [B, K, S, H]
    offset,  # int32 scalar
    lengths,  # [B] int32
    *,
    scale: float,
    window: int | None = None,
):
    """Masked fp32 softmax over the materialised [B, N, T, S] scores (plain jnp, tests only) -> [B, N, T, H] fp32."""
    b, n, t, h = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b, kv, n // kv, t, h).astype(jnp.float32)
    hp = lax.Precision.HIGHEST
    logits = jnp.einsum("bkgth,bksh->bkgts", qg, k_cache.astype(jnp.float32), precision=hp) * scale
    cols = jnp.arange(s)[None, None, :]
    pos = jnp.asarray(offset, jnp.int32).reshape(()) + jnp.arange(t)[None, :, None]
    ok = (cols <= pos) & (cols < jnp.asarray(lengths, jnp.int32)[:, None, None])  # [B, T, S]
    if window is not None:
        ok &= cols > pos - window
    ok = ok[:, None, None]
    logits = jnp.where(ok, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(ok, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksh->bkgth", p, v_cache.astype(jnp.float32), precision=hp)
    out = jnp.where(den > 0, out / jnp.where(den > 0, den, 1.0), 0.0)
    return out.reshape(b, n, t, h)


# ------------------------------------------------------------------------------------------------
# Public entry point


def _check_block(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < MIN_BLOCK or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK}, got {value!r}")
    return int(value)


def _validate(q, k_cache, v_cache, offset, lengths, window):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, N, T, H], got shape {q.shape}")
    if k_cache.ndim != 4:
        raise ValueError(f"k_cache must be [B, K, S, H], got shape {k_cache.shape}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {v_cache.shape} != k_cache shape {k_cache.shape}")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache and v_cache must share a dtype, got {k_cache.dtype} and {v_cache.dtype}")
    b, n, t, h = q.shape
    kb, kv, s, kh = k_cache.shape
    if kb != b or kh != h:
        raise ValueError(f"q [B, N, T, H] = {q.shape} and k_cache [B, K, S, H] = {k_cache.shape} disagree on B or H")
    if min(b, n, t, h, kv, s) < 1:
        raise ValueError(f"empty dimension in q {q.shape} or k_cache {k_cache.shape}")
    if n % kv:
        raise ValueError(f"query heads N={n} not a multiple of KV heads K={kv}")
    if jnp.shape(lengths) != (b,):
        raise ValueError(f"lengths must be [B] = ({b},), got shape {jnp.shape(lengths)}")
    if jnp.size(offset) != 1 or jnp.ndim(offset) > 1:
        raise ValueError(f"offset must be an int32 scalar, got shape {jnp.shape(offset)}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int | np.integer) or window < 1):
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")


def flash_attention(
    q,  # [B, N, T, H] queries of one prefill chunk (bf16 or fp32), already RoPE'd
    k_cache,  # [B, K, S, H] the cache with this chunk's keys written at [offset, offset + T)
    v_cache,  # [B, K, S, H]
    offset,  # int32 scalar (may be traced): absolute position of query 0
    lengths,  # [B] int32 live tokens per row after this chunk
    *,
    scale: float,
    window: int | None = None,
    implementation: str | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Causal attention of a prefill chunk over the cache -> [B, N, T, H] fp32 (semantics: module docstring).

    ``implementation``: "pallas" | "xla" | None (Pallas on GPU, the blocked XLA loop elsewhere). ``block_q``,
    ``block_k``, ``num_warps``, ``num_stages`` tune the Pallas kernel (None: ``default_tiling``); ``block_k`` is the
    XLA loop's key block (default 512). ``interpret`` defaults to ``$SPOTLIGHT_PALLAS_INTERPRET`` (else True off
    the GPU).
    """
    _validate(q, k_cache, v_cache, offset, lengths, window)
    impl = resolve_implementation(implementation)
    window = None if window is None else int(window)
    scale = float(scale)
    offset = jnp.asarray(offset, jnp.int32).reshape(1)
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    b, n, t, h = q.shape
    s = k_cache.shape[2]
    if impl == "xla":
        bk = XLA_BLOCK_K if block_k is None else block_k
        if isinstance(bk, bool) or not isinstance(bk, int | np.integer) or bk < 1:
            raise ValueError(f"block_k must be a positive int, got {bk!r}")
        return flash_attention_xla(q, k_cache, v_cache, offset, lengths, scale=scale, window=window, block_k=int(bk))
    if h < MIN_BLOCK or h & (h - 1):
        raise ValueError(f"the Pallas path needs head_dim H a power of two >= {MIN_BLOCK}, got {h}")
    dq, dk, dw, ds = default_tiling(h, k_cache.dtype.itemsize)
    bq = _check_block("block_q", dq if block_q is None else block_q)
    bk = _check_block("block_k", dk if block_k is None else block_k)
    bq = min(bq, max(MIN_BLOCK, next_pow2(t)))  # a short chunk (T = 1: a decode-like call) takes a smaller tile
    if s < MIN_BLOCK:  # a tiny cache: pad it to one tile, so that every key block lies inside the buffer
        lengths = jnp.minimum(lengths, s)  # the padded keys stay invisible
        pad = ((0, 0), (0, 0), (0, MIN_BLOCK - s), (0, 0))
        k_cache, v_cache = jnp.pad(k_cache, pad), jnp.pad(v_cache, pad)
        s = MIN_BLOCK
    # A key block never overhangs the whole buffer: the unmasked loop's plain loads are traced at this size.
    bk = min(bk, prev_pow2(s))
    return flash_attention_pallas(
        q,
        k_cache,
        v_cache,
        offset,
        lengths,
        scale=scale,
        window=window,
        block_q=bq,
        block_k=bk,
        num_warps=dw if num_warps is None else int(num_warps),
        num_stages=ds if num_stages is None else int(num_stages),
        interpret=default_interpret() if interpret is None else bool(interpret),
    )
