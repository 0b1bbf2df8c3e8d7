"""Hamming-similarity scoring of packed hash codes and exact top-k selection by counting.

Axis legend: B batch, N query heads, K KV heads, G = N / K, S cache length, W = bits / 32 words,
BK = B * K rows (one selection per batch row and KV head), T thresholds per counting pass.

Score of token s for KV head h: ``sum_{j in group h} popcount(~(q_j ^ k_s))`` over all W words
(GQA: query head j belongs to KV head j // G). Scores are integers in [0, G * bits].

Why counting instead of sorting: ``lax.top_k`` over 128K-512K scores costs 0.1-1 ms, 10-40x the
scan of the codes. Scores take at most G * bits + 1 values, so the k-th largest score t (the
threshold) is found by counting how many scores reach each of T candidate thresholds, narrowing
the candidate range T - 1 times per pass; ``ceil(log_{T-1}(G * bits + 1))`` passes (2 for 128-bit
codes and G <= 7 with T = 32). Then one compaction pass writes every token with score > t and the
first (by position) tokens with score == t until k are taken. All passes are grids over
(row, S-block) so that every SM streams part of the cache.

Kernels (Pallas Triton):
1. ``_score_count_kernel``: codes -> int16 scores + per-block counts for the first T thresholds.
2. ``_refine_kernel`` (0 or more): reads the previous per-block counts, narrows the range, counts
   the scores of its block against T finer thresholds.
3. ``_compact_kernel``: exact threshold from the last counts, per-block offsets (prefix over the
   blocks' counts), in-block ranks (cumsum), scatter of indices and scores; fills the unused
   slots with index 0 / score 0.

Bytes: codes (16 B/token/head at 128 bits) once + int16 scores written once and read once per
later pass (2 B each) + k indices and scores out.

The group sum of popcounts is computed with bit planes of the per-bit query counts: with
c_b = #query heads of the group whose bit b is 1 and M = 2^P - 1 >= G,
``score = sum_p 2^p popcount(~(plane_p ^ k)) - (M - G) * (bits - popcount(k))``: P = bit_length(G)
popcounts per word instead of G (popcount issues at a quarter of the integer rate on Hopper).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import cdiv, next_pow2, resolve_implementation, triton_params


class TopK(NamedTuple):
    indices: jax.Array  # [B, K, k] int32, 0 in invalid slots
    scores: jax.Array  # [B, K, k] int32, 0 in invalid slots
    valid: jax.Array  # [B, K, k] bool


# --------------------------------------------------------------------------------------------
# References (plain jnp)
# --------------------------------------------------------------------------------------------


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


def _live_budget(budget, b, k):
    if budget is None:
        return jnp.full((b,), k, jnp.int32)
    return jnp.minimum(jnp.asarray(budget, jnp.int32), k)


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


# --------------------------------------------------------------------------------------------
# Static plan of the counting passes
# --------------------------------------------------------------------------------------------


def level_steps(num_scores: int, num_thresholds: int) -> tuple[int, ...]:
    """Threshold spacing of each counting pass.

    Invariant: the threshold t lies in [lo, lo + w) with w = num_scores initially. A pass counts
    scores >= lo + j * step for j < T, with step = 1 once w <= T - 1 (then t and t + 1 are both
    counted, which the compaction needs), else ceil(w / (T - 1)); the next range has w = step.
    """
    t = num_thresholds
    steps, w = [], num_scores
    while True:
        step = 1 if w <= t - 1 else cdiv(w, t - 1)
        steps.append(step)
        if step == 1:
            return tuple(steps)
        w = step


def _pick_level(
    h,  # [NBP, T] int32 per-block counts of scores >= lo + j * step
    num_blocks: int,
    kk,  # scalar int32: live budget of the row
):
    """Index j* = max{j : count(score >= lo + j * step) >= kk}, clamped to [0, T - 2]."""
    nbp, t = h.shape
    rows = lax.broadcasted_iota(jnp.int32, (nbp, t), 0)
    h = jnp.where(rows < num_blocks, h, 0)  # rows past the grid are never written
    total = jnp.sum(h, axis=0)  # [T]
    jstar = jnp.sum((total >= kk).astype(jnp.int32)) - 1
    return jnp.clip(jstar, 0, t - 2), h


def _count_ge(
    s,  # [BS] int32 scores, -1 for tokens past the length
    thresholds,  # [T] int32
):
    return jnp.sum((s[:, None] >= thresholds[None, :]).astype(jnp.int32), axis=0)  # [T]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _query_planes(
    q_ref,  # [G, W] int32 query codes of the group
    group: int,
    num_planes: int,
):
    """Bit-sliced sum of the group's query words: planes[p] holds bit p of the per-bit count c_b."""
    planes = [jnp.zeros((q_ref.shape[1],), jnp.int32) for _ in range(num_planes)]
    for j in range(group):
        carry = q_ref[j, :]  # [W]
        for p in range(num_planes):
            planes[p], carry = planes[p] ^ carry, planes[p] & carry
    return planes


def _score_count_kernel(
    q_ref,  # [G, W] int32: query codes of the group of this KV head
    len_ref,  # [1] int32: live length of this batch row
    k_ref,  # [SPAN, W] int32: key codes of this program's span (rows past S are masked)
    s_ref,  # [SPAN] int16 out: scores, -1 past the length
    h_ref,  # [T] int32 out: counts of scores >= j * step over the span (pass 1)
    *,
    group: int,
    num_planes: int,
    bits: int,
    seq_len: int,
    step: int,
    sub: int,
):
    span, w = k_ref.shape
    t = h_ref.shape[0]
    planes = _query_planes(q_ref, group, num_planes)
    # score = sum_p 2^p popcount(~(plane_p ^ k)) - (M - G)(bits - popcount(k))
    #       = G * bits + (M - G) popcount(k) - sum_p 2^p popcount(plane_p ^ k)
    extra = (1 << num_planes) - 1 - group
    base = pl.program_id(1) * span
    length = len_ref[0]
    thresholds = lax.broadcasted_iota(jnp.int32, (t,), 0) * step

    def body(it, counts):
        off = pl.multiple_of(it * sub, sub)
        rows = base + off + lax.broadcasted_iota(jnp.int32, (sub,), 0)
        in_bounds = rows < seq_len
        k = plgpu.load(
            k_ref.at[pl.ds(off, sub), :], mask=jnp.broadcast_to(in_bounds[:, None], (sub, w)), other=0
        )  # [SUB, W]
        acc = jnp.zeros((sub,), jnp.int32)
        for p in range(num_planes):
            acc += jnp.sum(lax.population_count(k ^ planes[p][None, :]), axis=1) << p
        score = group * bits - acc
        if extra:
            score += extra * jnp.sum(lax.population_count(k), axis=1)
        score = jnp.where(rows < length, score, -1)
        plgpu.store(s_ref.at[pl.ds(off, sub)], score.astype(jnp.int16), mask=in_bounds)
        return counts + _count_ge(score, thresholds)

    steps = jnp.clip((length - base + sub - 1) // sub, 0, span // sub)  # skip sub-blocks past the length
    h_ref[...] = lax.fori_loop(0, steps, body, jnp.zeros((t,), jnp.int32))


def _load_scores(s_ref, off, sub, base, length):
    rows = base + off + lax.broadcasted_iota(jnp.int32, (sub,), 0)
    live = rows < length
    s = plgpu.load(s_ref.at[pl.ds(off, sub)], mask=live, other=-1).astype(jnp.int32)  # [SUB]
    return rows, jnp.where(live, s, -1)


def _refine_kernel(
    kk_ref,  # [1] int32: live budget of this batch row
    len_ref,  # [1] int32: live length of this batch row
    *refs,
    num_blocks: int,
    prev_step: int,
    step: int,
    sub: int,
    k: int,
    has_prev_lo: bool,
):
    # refs: [prev_lo_ref [NBP] int32], hp_ref [NBP, T] int32, s_ref [SPAN] int16,
    #       h_ref [T] int32 out, lo_ref [1] int32 out
    if has_prev_lo:
        prev_lo_ref, hp_ref, s_ref, h_ref, lo_ref = refs
        prev_lo = prev_lo_ref[0]
    else:
        hp_ref, s_ref, h_ref, lo_ref = refs
        prev_lo = 0
    span = s_ref.shape[0]
    t = h_ref.shape[0]
    length = len_ref[0]
    jstar, _ = _pick_level(hp_ref[...], num_blocks, jnp.minimum(kk_ref[0], k))
    lo = prev_lo + jstar * prev_step
    base = pl.program_id(1) * span
    thresholds = lo + lax.broadcasted_iota(jnp.int32, (t,), 0) * step

    def body(it, counts):
        _, s = _load_scores(s_ref, pl.multiple_of(it * sub, sub), sub, base, length)
        return counts + _count_ge(s, thresholds)

    steps = jnp.clip((length - base + sub - 1) // sub, 0, span // sub)
    h_ref[...] = lax.fori_loop(0, steps, body, jnp.zeros((t,), jnp.int32))
    lo_ref[...] = jnp.full((1,), lo, jnp.int32)


def _compact_kernel(
    kk_ref,  # [1] int32: live budget of this batch row
    len_ref,  # [1] int32: live length of this batch row
    *refs,
    num_blocks: int,
    sub: int,
    k: int,
    fill: int,
    has_prev_lo: bool,
):
    # refs: [lo_ref [NBP] int32], h_ref [NBP, T] int32 (last pass, step 1), s_ref [SPAN] int16,
    #       idx_ref [k] int32 out, sc_ref [k] int32 out, nv_ref [1] int32 out
    if has_prev_lo:
        lo_ref, h_ref, s_ref, idx_ref, sc_ref, nv_ref = refs
        lo = lo_ref[0]
    else:
        h_ref, s_ref, idx_ref, sc_ref, nv_ref = refs
        lo = 0
    span = s_ref.shape[0]
    blk = pl.program_id(1)
    kk = jnp.minimum(kk_ref[0], k)
    length = len_ref[0]
    jstar, h = _pick_level(h_ref[...], num_blocks, kk)
    nbp, t = h.shape
    col = lax.broadcasted_iota(jnp.int32, (nbp, t), 1)
    ge = jnp.sum(jnp.where(col == jstar, h, 0), axis=1)  # [NBP] per-block count of score >= thr
    gt = jnp.sum(jnp.where(col == jstar + 1, h, 0), axis=1)  # [NBP] per-block count of score > thr
    before = lax.broadcasted_iota(jnp.int32, (nbp,), 0) < blk
    off_gt = jnp.sum(jnp.where(before, gt, 0))
    off_eq = jnp.sum(jnp.where(before, ge - gt, 0))
    total_gt = jnp.sum(gt)
    n_valid = jnp.minimum(kk, jnp.sum(ge))
    thr = lo + jstar
    base = blk * span

    def body(it, carry):
        n_gt, n_eq = carry
        rows, s = _load_scores(s_ref, pl.multiple_of(it * sub, sub), sub, base, length)
        is_gt = s > thr
        is_eq = s == thr
        rank_gt = jnp.cumsum(is_gt.astype(jnp.int32)) - 1
        rank_eq = jnp.cumsum(is_eq.astype(jnp.int32)) - 1
        pos = jnp.where(is_gt, off_gt + n_gt + rank_gt, total_gt + off_eq + n_eq + rank_eq)
        take = (is_gt | is_eq) & (pos < n_valid)
        pos = jnp.where(take, pos, k)  # masked lanes point past the row (dropped in interpret mode)
        plgpu.store(idx_ref.at[pos], rows, mask=take)
        plgpu.store(sc_ref.at[pos], s, mask=take)
        return n_gt + jnp.sum(is_gt.astype(jnp.int32)), n_eq + jnp.sum(is_eq.astype(jnp.int32))

    steps = jnp.clip((length - base + sub - 1) // sub, 0, span // sub)
    lax.fori_loop(0, steps, body, (jnp.int32(0), jnp.int32(0)))

    # Unused slots [n_valid, k): this program zero-fills its share of them.
    slots = blk * fill + lax.broadcasted_iota(jnp.int32, (fill,), 0)
    empty = (slots >= n_valid) & (slots < k)
    slots = jnp.where(empty, slots, k)
    zeros = jnp.zeros((fill,), jnp.int32)
    plgpu.store(idx_ref.at[slots], zeros, mask=empty)
    plgpu.store(sc_ref.at[slots], zeros, mask=empty)
    nv_ref[...] = jnp.full((1,), n_valid, jnp.int32)


# --------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------


def plan_spans(seq_len: int, rows: int, sub: int, max_blocks: int = 64, target_programs: int = 528):
    """(sub, span, num_blocks): programs stream ``span`` tokens in ``sub``-token steps.

    Few enough blocks per row that every program can read the whole [blocks, T] count table of
    the previous pass cheaply, and enough programs (about 4 per H100 SM) to keep HBM busy.
    """
    sub = min(sub, next_pow2(seq_len))
    want_blocks = min(max_blocks, max(1, cdiv(target_programs, rows)), cdiv(seq_len, sub))
    span = sub * cdiv(cdiv(seq_len, want_blocks), sub)
    span = next_pow2(span) if span > sub else sub
    return sub, span, cdiv(seq_len, span)


def _scores_pass(q_codes, k_codes, lengths, *, sub, span, num_thresholds, step, num_warps, interpret):
    """Pass 1: int16 scores [BK, S] and per-block counts [BK, NBP, T]."""
    b, n, w = q_codes.shape
    kv, s = k_codes.shape[1], k_codes.shape[2]
    bk, g, bits = b * kv, n // kv, 32 * w
    qc = lax.bitcast_convert_type(q_codes, jnp.int32).reshape(bk, g, w)
    codes = lax.bitcast_convert_type(k_codes, jnp.int32).reshape(bk, s, w)
    nb = cdiv(s, span)
    kernel = functools.partial(
        _score_count_kernel,
        group=g,
        num_planes=max(1, g.bit_length()),
        bits=bits,
        seq_len=s,
        step=step,
        sub=sub,
    )
    scores, counts = pl.pallas_call(
        kernel,
        grid=(bk, nb),
        in_specs=[
            pl.BlockSpec((None, g, w), lambda r, i: (r, 0, 0)),
            pl.BlockSpec((1,), lambda r, i: (r // kv,)),
            pl.BlockSpec((None, span, w), lambda r, i: (r, i, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, span), lambda r, i: (r, i)),
            pl.BlockSpec((None, None, num_thresholds), lambda r, i: (r, i, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((bk, s), jnp.int16),
            jax.ShapeDtypeStruct((bk, next_pow2(nb), num_thresholds), jnp.int32),
        ],
        compiler_params=triton_params(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="hamming_score_count",
    )(qc, lengths, codes)
    return scores, counts


@functools.partial(jax.jit, static_argnames=("sub", "num_warps", "interpret"))
def _hamming_scores_pallas(q_codes, k_codes, *, sub=1024, num_warps=4, interpret=False):
    b, kv, s, _ = k_codes.shape
    sub, span, _ = plan_spans(s, b * kv, sub)
    scores, _ = _scores_pass(
        q_codes,
        k_codes,
        jnp.full((b,), s, jnp.int32),
        sub=sub,
        span=span,
        num_thresholds=2,
        step=1,
        num_warps=num_warps,
        interpret=interpret,
    )
    return scores.astype(jnp.int32).reshape(b, kv, s)


@functools.partial(jax.jit, static_argnames=("k", "block_s", "num_thresholds", "num_warps", "max_blocks", "interpret"))
def hamming_topk_rows(
    q_codes,  # [B, N, W] uint32
    k_codes,  # [B, K, S, W] uint32
    lengths,  # [B] int32
    budget,  # [B] int32 live budget (clamped to k)
    *,
    k: int,
    block_s: int = 1024,
    num_thresholds: int = 32,
    num_warps: int = 4,
    max_blocks: int = 64,
    interpret: bool = False,
):
    """Pallas top-k; returns (indices [BK, k] int32, scores [BK, k] int32, n_valid [BK] int32).

    ``block_s`` is the number of tokens per inner step of a program. Slots ``>= n_valid`` of a
    row hold index 0 and score 0. This is the form that ``sparse_decode_attention_rows``
    consumes without materialising a boolean mask.
    """
    b, n, w = q_codes.shape
    kv, s = k_codes.shape[1], k_codes.shape[2]
    bk, bits = b * kv, 32 * w
    t = num_thresholds
    sub, span, nb = plan_spans(s, bk, block_s, max_blocks)
    nbp = next_pow2(nb)
    steps = level_steps((n // kv) * bits + 1, t)
    lengths = lengths.astype(jnp.int32)
    budget = budget.astype(jnp.int32)

    scores, counts = _scores_pass(
        q_codes,
        k_codes,
        lengths,
        sub=sub,
        span=span,
        num_thresholds=t,
        step=steps[0],
        num_warps=num_warps,
        interpret=interpret,
    )
    params = triton_params(num_warps=num_warps, num_stages=2)
    row_spec = pl.BlockSpec((1,), lambda r, i: (r // kv,))
    counts_spec = pl.BlockSpec((None, nbp, t), lambda r, i: (r, 0, 0))
    lo_in_spec = pl.BlockSpec((None, nbp), lambda r, i: (r, 0))
    score_spec = pl.BlockSpec((None, span), lambda r, i: (r, i))
    lo = None
    for level in range(1, len(steps)):
        kernel = functools.partial(
            _refine_kernel,
            num_blocks=nb,
            prev_step=steps[level - 1],
            step=steps[level],
            sub=sub,
            k=k,
            has_prev_lo=lo is not None,
        )
        extra = [] if lo is None else [lo]
        counts, lo = pl.pallas_call(
            kernel,
            grid=(bk, nb),
            in_specs=[row_spec, row_spec] + ([] if lo is None else [lo_in_spec]) + [counts_spec, score_spec],
            out_specs=[
                pl.BlockSpec((None, None, t), lambda r, i: (r, i, 0)),
                pl.BlockSpec((None, 1), lambda r, i: (r, i)),
            ],
            out_shape=[
                jax.ShapeDtypeStruct((bk, nbp, t), jnp.int32),
                jax.ShapeDtypeStruct((bk, nbp), jnp.int32),
            ],
            compiler_params=params,
            interpret=interpret,
            name=f"hamming_refine_{level}",
        )(budget, lengths, *extra, counts, scores)

    fill = next_pow2(cdiv(k, nb))
    kernel = functools.partial(_compact_kernel, num_blocks=nb, sub=sub, k=k, fill=fill, has_prev_lo=lo is not None)
    extra = [] if lo is None else [lo]
    out_row_spec = pl.BlockSpec((None, k), lambda r, i: (r, 0))
    idx, sc, nv = pl.pallas_call(
        kernel,
        grid=(bk, nb),
        in_specs=[row_spec, row_spec] + ([] if lo is None else [lo_in_spec]) + [counts_spec, score_spec],
        out_specs=[out_row_spec, out_row_spec, pl.BlockSpec((None, 1), lambda r, i: (r, i))],
        out_shape=[
            jax.ShapeDtypeStruct((bk, k), jnp.int32),
            jax.ShapeDtypeStruct((bk, k), jnp.int32),
            jax.ShapeDtypeStruct((bk, nbp), jnp.int32),
        ],
        compiler_params=params,
        interpret=interpret,
        name="hamming_compact",
    )(budget, lengths, *extra, counts, scores)
    return idx, sc, nv[:, 0]


def hamming_scores(
    q_codes,  # [B, N, W] uint32
    k_codes,  # [B, K, S, W] uint32
    *,
    implementation: str | None = None,
    interpret: bool = False,
):
    """int32 [B, K, S] group-summed XNOR-popcount scores."""
    if resolve_implementation(implementation) == "xla":
        return hamming_scores_reference(q_codes, k_codes)
    return _hamming_scores_pallas(q_codes, k_codes, interpret=interpret)


def hamming_topk(
    q_codes,  # [B, N, W] uint32
    k_codes,  # [B, K, S, W] uint32
    lengths,  # [B] int32
    k: int,
    budget=None,  # [B] int32 <= k: live budget; None means k
    *,
    implementation: str | None = None,
    interpret: bool = False,
    block_s: int = 1024,
    num_thresholds: int = 32,
    max_blocks: int = 64,
) -> TopK:
    """Per (batch row, KV head) the ``k`` highest-scoring of the first ``lengths[b]`` tokens.

    Exact up to ties. Only the first ``min(budget[b], lengths[b])`` slots are valid; the others
    hold index 0 and score 0 (safe to gather).
    """
    b, kv = k_codes.shape[:2]
    lengths = jnp.asarray(lengths, jnp.int32)
    if resolve_implementation(implementation) == "xla":
        return hamming_topk_reference(q_codes, k_codes, lengths, k, budget)
    live = _live_budget(budget, b, k)
    idx, sc, nv = hamming_topk_rows(
        q_codes,
        k_codes,
        lengths,
        live,
        k=k,
        block_s=block_s,
        num_thresholds=num_thresholds,
        max_blocks=max_blocks,
        interpret=interpret,
    )
    valid = jnp.arange(k)[None, :] < nv[:, None]
    return TopK(idx.reshape(b, kv, k), sc.reshape(b, kv, k), valid.reshape(b, kv, k))
