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

Counting (all passes): each token's score becomes a thermometer mask (bit j set iff
score >= lo + j * step, at most 31 thresholds), and the masks are added into bit-sliced per-lane
counters with carry-save adders (~3 logic ops per token whatever T); the per-threshold totals are
extracted once per program (byte-lane SWAR sums). Loops prefetch the next step's loads (Triton
does not pipeline these loops), and the compaction ranks both classes with one packed cumsum.

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


def _thermometer(
    s,  # [Q] int32 scores, -1 for dead tokens
    lo,  # scalar int32 >= 0
    step: int,
    t: int,
):
    """[Q] int32 masks: bit j set iff s >= lo + j * step (j < t <= 31); 0 for dead tokens."""
    e = jnp.maximum(s - lo + step, 0)
    b = e if step == 1 else lax.div(e.astype(jnp.uint32), jnp.uint32(step)).astype(jnp.int32)
    b = jnp.minimum(b, t)
    return lax.shift_left(jnp.ones_like(b), b) - 1


def _bitsliced_add(
    counters,  # tuple of L [Q] int32: bit j of counters[l] = bit l of lane's count for threshold j
    masks,  # list of [Q] int32 masks, weight 1
):
    """Carry-save addition of the masks into the bit-sliced per-lane counters (counts < 2^L)."""
    levels = len(counters)
    cols = [[c] for c in counters]
    cols[0] = cols[0] + list(masks)
    for lv in range(levels):
        col = cols[lv]
        while len(col) > 1:
            if len(col) >= 3:
                a, b, c = col.pop(0), col.pop(0), col.pop(0)
                ab = a ^ b
                col.append(ab ^ c)
                carry = (a & b) | (c & ab)
            else:
                a, b = col.pop(0), col.pop(0)
                col.append(a ^ b)
                carry = a & b
            if lv + 1 < levels:
                cols[lv + 1].append(carry)
    return tuple(c[0] for c in cols)


def _extract_counts(
    counters,  # tuple of L [Q] int32 bit-sliced counters
    t: int,
    lane_max: int,
):
    """[T] int32: per threshold, the sum over lanes of the bit-sliced counts."""
    q = counters[0].shape[0]
    iota = lax.broadcasted_iota(jnp.int32, (t,), 0)
    out = jnp.zeros((t,), jnp.int32)
    if lane_max <= 255 and lane_max * q <= 0xFFFF:
        # Byte lanes: y_k holds the counts of thresholds k, k+8, k+16, k+24; summed as 16-bit pairs.
        for k in range(min(8, t)):
            y = None
            for lv, c in enumerate(counters):
                term = lax.shift_right_logical(c, k) & 0x01010101
                term = term << lv if lv else term
                y = term if y is None else y + term
            for sh, js in ((0, (k, k + 16)), (8, (k + 8, k + 24))):
                tot = jnp.sum(lax.shift_right_logical(y, sh) & 0x00FF00FF)
                for half, j in enumerate(js):
                    if j < t:
                        val = lax.shift_right_logical(tot, 16 * half) & 0xFFFF
                        out = jnp.where(iota == j, val, out)
        return out
    for j in range(t):
        v = None
        for lv, c in enumerate(counters):
            term = lax.shift_right_logical(c, j) & 1
            term = term << lv if lv else term
            v = term if v is None else v + term
        out = jnp.where(iota == j, jnp.sum(v), out)
    return out


def _multiple_of(x, m: int):
    """``pl.multiple_of`` for traced offsets; plain ints (the prefetch of step 0) pass through."""
    return pl.multiple_of(x, m) if isinstance(x, jax.core.Tracer) else x


def _stream(load, body, steps, init):
    """fori_loop over ``steps`` iterations that prefetches iteration i + 1's inputs while computing i."""

    def step(it, carry):
        acc, cur = carry
        nxt = load(it + 1)
        return body(it, cur, acc), nxt

    acc, _ = lax.fori_loop(0, steps, step, (init, load(0)))
    return acc


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
    chunks: int,
):
    span, w = k_ref.shape
    t = h_ref.shape[0]
    q = sub // chunks
    planes = _query_planes(q_ref, group, num_planes)
    # score = sum_p 2^p popcount(~(plane_p ^ k)) - (M - G)(bits - popcount(k))
    #       = G * bits + (M - G) popcount(k) - sum_p 2^p popcount(plane_p ^ k)
    extra = (1 << num_planes) - 1 - group
    base = pl.program_id(1) * span
    length = len_ref[0]
    lim = jnp.minimum(jnp.minimum(length, seq_len), base + span)  # rows >= lim are not read
    lane = lax.broadcasted_iota(jnp.int32, (q,), 0)

    def load(it):
        out = []
        for c in range(chunks):
            off = _multiple_of(it * sub + c * q, q)
            live = base + off + lane < lim
            out.append(plgpu.load(k_ref.at[pl.ds(off, q), :], mask=jnp.broadcast_to(live[:, None], (q, w)), other=0))
        return tuple(out)

    def body(it, codes, counters):
        masks = []
        for c in range(chunks):
            off = _multiple_of(it * sub + c * q, q)
            rows = base + off + lane
            k = codes[c]  # [Q, W]
            acc = jnp.zeros((q,), jnp.int32)
            for p in range(num_planes):
                acc += jnp.sum(lax.population_count(k ^ planes[p][None, :]), axis=1) << p
            score = group * bits - acc
            if extra:
                score += extra * jnp.sum(lax.population_count(k), axis=1)
            score = jnp.where(rows < length, score, -1)
            plgpu.store(s_ref.at[pl.ds(off, q)], score.astype(jnp.int16), mask=rows < seq_len)
            masks.append(_thermometer(score, 0, step, min(t, 31)))
        return _bitsliced_add(counters, masks)

    lane_max = (span // sub) * chunks
    init = tuple(jnp.zeros((q,), jnp.int32) for _ in range(lane_max.bit_length()))
    steps = jnp.clip((length - base + sub - 1) // sub, 0, span // sub)  # skip sub-blocks past the length
    h_ref[...] = _extract_counts(_stream(load, body, steps, init), t, lane_max)


def _score_loader(s_ref, sub, chunks, base, length, seq_len, steps):
    """Loads of int16 scores as int32, -1 past the length. The load mask (static seq_len, scalar
    step bound) keeps 8-token groups uniform so that the loads stay 16 bytes wide."""
    q = sub // chunks
    lane = lax.broadcasted_iota(jnp.int32, (q,), 0)

    def load(it):
        out = []
        for c in range(chunks):
            off = _multiple_of(it * sub + c * q, q)
            rows = base + off + lane
            s = plgpu.load(s_ref.at[pl.ds(off, q)], mask=(rows < seq_len) & (it < steps), other=-1)
            out.append(jnp.where(rows < length, s.astype(jnp.int32), -1))
        return tuple(out)

    return load


def _refine_kernel(
    kk_ref,  # [1] int32: live budget of this batch row
    len_ref,  # [1] int32: live length of this batch row
    *refs,
    num_blocks: int,
    prev_step: int,
    step: int,
    sub: int,
    chunks: int,
    seq_len: int,
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
    base = pl.program_id(1) * span
    steps = jnp.clip((length - base + sub - 1) // sub, 0, span // sub)
    load = _score_loader(s_ref, sub, chunks, base, length, seq_len, steps)
    first = load(0)  # issue the score loads before the count-table reduction
    jstar, _ = _pick_level(hp_ref[...], num_blocks, jnp.minimum(kk_ref[0], k))
    lo = prev_lo + jstar * prev_step

    def body(it, scores, counters):
        return _bitsliced_add(counters, [_thermometer(s, lo, step, min(t, 31)) for s in scores])

    def step_fn(it, carry):
        acc, cur = carry
        nxt = load(it + 1)
        return body(it, cur, acc), nxt

    lane_max = (span // sub) * chunks
    init = tuple(jnp.zeros((sub // chunks,), jnp.int32) for _ in range(lane_max.bit_length()))
    counters, _ = lax.fori_loop(0, steps, step_fn, (init, first))
    h_ref[...] = _extract_counts(counters, t, lane_max)
    lo_ref[...] = jnp.full((1,), lo, jnp.int32)


def _compact_kernel(
    kk_ref,  # [1] int32: live budget of this batch row
    len_ref,  # [1] int32: live length of this batch row
    *refs,
    num_blocks: int,
    sub: int,
    seq_len: int,
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
    base = blk * span
    steps = jnp.clip((length - base + sub - 1) // sub, 0, span // sub)
    load = _score_loader(s_ref, sub, 1, base, length, seq_len, steps)
    first = load(0)  # issue the score loads before the count-table reductions
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
    lane = lax.broadcasted_iota(jnp.int32, (sub,), 0)

    def step_fn(it, carry):
        (n_gt, n_eq), (s,) = carry
        nxt = load(it + 1)
        rows = base + _multiple_of(it * sub, sub) + lane
        is_gt = s > thr
        is_eq = s == thr
        # One scan for both ranks: > thr counts in the low 16 bits, == thr in the high 16 (sub < 2^15).
        packed = is_gt.astype(jnp.int32) + (is_eq.astype(jnp.int32) << 16)
        cs = jnp.cumsum(packed)
        rank_gt = (cs & 0xFFFF) - 1
        rank_eq = lax.shift_right_logical(cs, 16) - 1
        pos = jnp.where(is_gt, off_gt + n_gt + rank_gt, total_gt + off_eq + n_eq + rank_eq)
        take = (is_gt | is_eq) & (pos < n_valid)
        pos = jnp.where(take, pos, k)  # masked lanes point past the row (dropped in interpret mode)
        plgpu.store(idx_ref.at[pos], rows, mask=take)
        plgpu.store(sc_ref.at[pos], s, mask=take)
        tot = jnp.sum(packed)
        return (n_gt + (tot & 0xFFFF), n_eq + lax.shift_right_logical(tot, 16)), nxt

    lax.fori_loop(0, steps, step_fn, ((jnp.int32(0), jnp.int32(0)), first))

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


def _scores_pass(q_codes, k_codes, lengths, *, sub, span, num_thresholds, step, num_warps, interpret, chunks=4):
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
        chunks=min(chunks, sub),
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


@functools.partial(
    jax.jit, static_argnames=("k", "block_s", "num_thresholds", "num_warps", "max_blocks", "chunks", "interpret")
)
def hamming_topk_rows(
    q_codes,  # [B, N, W] uint32
    k_codes,  # [B, K, S, W] uint32
    lengths,  # [B] int32
    budget,  # [B] int32 live budget (clamped to k)
    *,
    k: int,
    block_s: int = 1024,
    num_thresholds: int = 32,
    num_warps: int = 8,
    max_blocks: int = 64,
    chunks: int = 4,
    interpret: bool = False,
):
    """Pallas top-k; returns (indices [BK, k] int32, scores [BK, k] int32, n_valid [BK] int32).

    ``block_s`` is the number of tokens per inner step of a program (``chunks`` loads of
    ``block_s / chunks`` tokens; 1 token per thread and chunk at block_s = chunks * 32 * num_warps).
    At most 31 of the ``num_thresholds`` (a power of two) are used: one bit each in an int32 mask.
    Slots ``>= n_valid`` of a row hold index 0 and score 0. This is the form that ``sparse_decode_attention_rows``
    consumes without materialising a boolean mask.
    """
    b, n, w = q_codes.shape
    kv, s = k_codes.shape[1], k_codes.shape[2]
    bk, bits = b * kv, 32 * w
    t = num_thresholds
    t_real = min(t, 31)  # column 31 of a 32-wide count table stays 0 (masks have 31 usable bits)
    sub, span, nb = plan_spans(s, bk, block_s, max_blocks)
    chunks = min(chunks, sub)
    # Refine / compact stream 2-byte scores: wider steps (2 * sub tokens, one load, 8 per thread).
    sub2 = min(span, 2 * sub)
    sub3 = sub2  # compact: 8 tokens per thread per scan (16 would need ~200 registers: 1 program per SM)
    nbp = next_pow2(nb)
    steps = level_steps((n // kv) * bits + 1, t_real)
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
        chunks=chunks,
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
            sub=sub2,
            chunks=1,
            seq_len=s,
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
    kernel = functools.partial(
        _compact_kernel, num_blocks=nb, sub=sub3, seq_len=s, k=k, fill=fill, has_prev_lo=lo is not None
    )
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
