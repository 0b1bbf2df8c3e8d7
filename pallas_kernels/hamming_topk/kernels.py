"""The Pallas (Triton) kernels of the top-k and their wrappers: pass 1 (scores + counts), the refine passes,
the compaction, the one-launch kernel that runs all three, and ``hamming_topk`` / ``hamming_scores``.

Latency (refine and compaction are short: 4 steps of 2048 scores per program at 512K): every pass
keeps ``depth`` steps' loads in flight (all of a program's span when it has at most ``depth``
steps) and converts loaded registers only after the whole group was issued; the score loads of the
later passes do not depend on the row length (pass 1 wrote -1 past it) and go out before the
count-table reads, behind a CTA barrier that keeps ptxas from reordering them. The compaction
ranks a step's tokens with an in-thread prefix over each thread's 8 tokens plus one scan over the
per-thread totals, in the one-token-per-thread layout of its scatter stores (no layout shuffles).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    MAX_SPINS,
    cdiv,
    next_pow2,
    resolve_implementation,
    sync_count,
    triton_params,
    wait_count,
)
from pallas_kernels.hamming_topk.arithmetic import (
    _bitsliced_add,
    _csa_scores,
    _extract_counts,
    _query_planes,
    _query_word_planes,
    _split_lanes,
    _split_words,
    _sum_columns,
    _thermometer,
)
from pallas_kernels.hamming_topk.plan import (
    TUNING,
    _table_rows,
    default_grid,
    launches_once,
    level_steps,
    plan_spans,
)
from pallas_kernels.hamming_topk.reference import TopK, hamming_scores_reference, hamming_topk_reference, kernel_budget

# --------------------------------------------------------------------------------------------
# References (plain jnp)
# --------------------------------------------------------------------------------------------


def _pick_level(
    h,  # [NBP, T] int32 per-block counts of scores >= lo + j * step
    num_blocks: int,
    kk,  # scalar int32: live budget of the row
):
    """Index j* = max{j : count(score >= lo + j * step) >= kk}, clamped to [0, T - 2]."""
    nbp, t = h.shape
    if num_blocks < nbp:
        rows = lax.broadcasted_iota(jnp.int32, (nbp, t), 0)
        h = jnp.where(rows < num_blocks, h, 0)  # rows past the grid are never written
    total = jnp.sum(h, axis=0)  # [T]
    jstar = jnp.sum((total >= kk).astype(jnp.int32)) - 1
    return jnp.clip(jstar, 0, t - 2), h


def _store_counts(h_ref, parts):
    for off, vals in parts:
        h_ref[pl.ds(off, vals.shape[0])] = vals


def _multiple_of(x, m: int):
    """``pl.multiple_of`` for traced offsets; plain ints (static steps) pass through."""
    return pl.multiple_of(x, m) if isinstance(x, jax.core.Tracer) else x


def _stream(load, body, num_steps: int, steps, init, group: int, setup=None, fence: bool = False):
    """``acc = body(it, load(it), acc, ctx)`` for it < steps, with ``group`` steps' loads in flight.

    ``num_steps`` (static) bounds the dynamic ``steps``. ``load`` only issues (masked) reads; every use of
    the loaded registers belongs to ``body``, so that nothing waits on a load before the next group is
    issued. Spans of at most ``group`` steps are straight-line code with all loads issued first; longer
    ones loop over groups (issue group j + 1, then compute group j). ``ctx = setup()`` runs once after
    the first group is issued (reads that overlap with it); ``fence`` puts a CTA barrier between the two
    (compiled only), without which ptxas issues setup's loads first and the group's only after setup's
    first results arrived (seen in the SASS). ``body`` also runs on steps in
    [steps, ceil(steps / group) * group): their loads are masked and must leave ``acc`` unchanged.
    """
    first = tuple(load(i) for i in range(min(num_steps, group)))
    if fence and setup is not None and hasattr(plgpu, "debug_barrier"):
        plgpu.debug_barrier()  # loads stay in flight across it
    ctx = setup() if setup is not None else None
    if num_steps <= group:
        acc = init
        for i, buf in enumerate(first):
            acc = body(i, buf, acc, ctx)
        return acc, ctx
    assert num_steps % group == 0, (num_steps, group)

    def loop(j, carry):
        acc, cur = carry
        nxt = tuple(load((j + 1) * group + i) for i in range(group))
        for i in range(group):
            acc = body(j * group + i, cur[i], acc, ctx)
        return acc, nxt

    acc, _ = lax.fori_loop(0, (steps + group - 1) // group, loop, (init, first))
    return acc, ctx


class _Window:
    """Rows [start, start + size) of axis ``len(lead)`` of ``ref[lead]``, accessed like a ref in one indexer.

    ``w[i, ...]`` / ``w[i, ...] = x`` / ``w.at[i, ...]`` are ``ref[lead..., start + i, ...]`` (``i`` an index, a
    ``pl.ds``, a slice or an index array; ``...`` the whole window): the Pallas Triton lowering cannot load through
    a view of a view ("multiple indexers"), and the one-launch kernel hands the passes' bodies their (row, block)
    windows of whole arrays.
    """

    def __init__(self, ref, lead: tuple, start, size: int):
        self.ref, self.lead, self.start = ref, lead, start
        self.shape = (size, *ref.shape[len(lead) + 1 :])

    def _index(self, idx) -> tuple:
        idx = idx if isinstance(idx, tuple) else (idx,)
        if idx and idx[0] is Ellipsis:
            idx = idx[1:]
        idx = idx + (slice(None),) * (len(self.shape) - len(idx))
        first = idx[0]
        if isinstance(first, slice):
            lo, hi = first.start or 0, self.shape[0] if first.stop is None else first.stop
            first = pl.ds(self.start + lo, hi - lo)
        elif isinstance(first, pl.Slice):
            first = pl.ds(self.start + first.start, first.size)
        else:
            first = self.start + first
        return (*self.lead, first, *idx[1:])

    @property
    def at(self):
        return _WindowAt(self)

    def __getitem__(self, idx):
        return self.ref[self._index(idx)]

    def __setitem__(self, idx, value):
        self.ref[self._index(idx)] = value


class _WindowAt:
    def __init__(self, window: _Window):
        self.window = window

    def __getitem__(self, idx):
        return self.window.ref.at[self.window._index(idx)]


def _block_id(blk):
    """The S-block of this program: axis 1 of the (row, block) grid, or ``blk`` when the one-launch kernel
    runs a pass's body for a work item of its own."""
    return pl.program_id(1) if blk is None else blk


def _score_count_kernel(
    q_ref,  # [G, W] int32: query codes of the group of this KV head
    len_ref,  # [1] int32: live length of this batch row
    k_ref,  # [SPAN, W] int32: key codes of this program's span (rows past S are masked)
    s_ref,  # [SPAN] int16 out: scores, -1 past the length (every row < S is written)
    h_ref,  # [T] int32 out: counts of scores >= j * step over the span (pass 1)
    *,
    group: int,
    num_planes: int,
    bits: int,
    seq_len: int,
    step: int,
    sub: int,
    chunks: int,
    depth: int,
    csa: bool,
    csa_full_adders: int | None,
    blk=None,
):
    span, w = k_ref.shape
    t = h_ref.shape[0]
    q = sub // chunks
    # CSA path: a token's words as separate [Q] vectors, from loads of at most 4 words (16 B) per token so that
    # each thread holds whole rows of a tile and the split into words is thread-local.
    tile_w = min(w, 4) if csa else w
    base = _block_id(blk) * span
    length = len_ref[0]
    full_blocks = seq_len % span == 0  # no block extends past S
    lim = jnp.minimum(jnp.minimum(length, seq_len), base + span)  # rows >= lim are not read ...
    lane = lax.broadcasted_iota(jnp.int32, (q,), 0)
    num_steps = span // sub
    steps = jnp.clip((length - base + sub - 1) // sub, 0, num_steps)  # sub-blocks past the length are skipped

    def load(it):
        out = []
        for c in range(chunks):
            off = _multiple_of(it * sub + c * q, q)
            cols = [slice(None)] if tile_w == w else [pl.ds(j, tile_w) for j in range(0, w, tile_w)]
            refs = [k_ref.at[pl.ds(off, q), col] for col in cols]
            if isinstance(it, int) and it == 0:  # ... except in step 0: its loads go out before the length arrives
                if full_blocks:
                    out.append(tuple(plgpu.load(ref) for ref in refs))
                    continue
                live = base + off + lane < seq_len
            else:
                live = base + off + lane < lim
            mask = jnp.broadcast_to(live[:, None], (q, tile_w))
            out.append(tuple(plgpu.load(ref, mask=mask, other=0) for ref in refs))
        return tuple(out)

    # score = sum_p 2^p popcount(~(plane_p ^ k)) - (M - G)(bits - popcount(k))
    #       = G * bits + (M - G) popcount(k) - sum_p 2^p popcount(plane_p ^ k)
    extra = (1 << num_planes) - 1 - group

    def body(it, codes, counters, planes):
        masks = []
        for c in range(chunks):
            off = _multiple_of(it * sub + c * q, q)
            rows = base + off + lane
            if csa:
                words = [x for tile in codes[c] for x in _split_words(tile)]
                score = _csa_scores(words, planes, csa_full_adders)
            else:
                (k,) = codes[c]  # [Q, W]
                acc = jnp.zeros((q,), jnp.int32)
                for p in range(num_planes):
                    acc += jnp.sum(lax.population_count(k ^ planes[p][None, :]), axis=1) << p
                score = group * bits - acc
                if extra:
                    score += extra * jnp.sum(lax.population_count(k), axis=1)
            score = jnp.where(rows < length, score, -1)
            plgpu.store(s_ref.at[pl.ds(off, q)], score.astype(jnp.int16), mask=None if full_blocks else rows < seq_len)
            masks.append(_thermometer(score, 0, step, min(t, 31)))
        return _bitsliced_add(counters, masks)

    lane_max = num_steps * chunks
    init = tuple(jnp.zeros((q,), jnp.int32) for _ in range(lane_max.bit_length()))
    planes = _query_word_planes if csa else _query_planes
    counters, _ = _stream(load, body, num_steps, steps, init, depth, lambda: planes(q_ref, group, num_planes))
    _store_counts(h_ref, _extract_counts(counters, t, lane_max, span))
    if num_steps > depth:  # skipped sub-blocks still get -1: the later passes read scores without the length
        minus1 = jnp.full((sub,), -1, jnp.int16)
        iota = lax.broadcasted_iota(jnp.int32, (sub,), 0)

        def fill(it, carry):
            off = _multiple_of(it * sub, sub)
            plgpu.store(s_ref.at[pl.ds(off, sub)], minus1, mask=None if full_blocks else base + off + iota < seq_len)
            return carry

        lax.fori_loop((steps + depth - 1) // depth * depth, num_steps, fill, 0)


def _score_loader(s_ref, sub, base, seq_len):
    """Loads of ``sub`` int16 scores, masked only by the static S: pass 1 wrote -1 past the length, so
    the loads need not wait for it and 8-token groups stay uniform (16-byte loads)."""
    lane = lax.broadcasted_iota(jnp.int32, (sub,), 0)
    span = s_ref.shape[0]

    def load(it):
        off = _multiple_of(it * sub, sub)
        if seq_len % span == 0:  # no block extends past S
            return plgpu.load(s_ref.at[pl.ds(off, sub)])
        return plgpu.load(s_ref.at[pl.ds(off, sub)], mask=base + off + lane < seq_len, other=-1)

    return load


def _refine_kernel(
    kk_ref,  # [1] int32: live budget of this batch row
    len_ref,  # [1] int32: live length of this batch row
    *refs,
    num_blocks: int,
    prev_step: int,
    step: int,
    sub: int,
    lanes: int,
    seq_len: int,
    k: int,
    has_prev_lo: bool,
    depth: int,
    compiled: bool,
    blk=None,
):
    # refs: [prev_lo_ref [NBP] int32], hp_ref [NBP, T] int32, s_ref [SPAN] int16,
    #       h_ref [T] int32 out, lo_ref [1] int32 out
    if has_prev_lo:
        prev_lo_ref, hp_ref, s_ref, h_ref, lo_ref = refs
    else:
        hp_ref, s_ref, h_ref, lo_ref = refs
    span = s_ref.shape[0]
    t = h_ref.shape[0]
    length = len_ref[0]
    base = _block_id(blk) * span
    num_steps = span // sub
    steps = jnp.clip((length - base + sub - 1) // sub, 0, num_steps)
    load = _score_loader(s_ref, sub, base, seq_len)

    def setup():  # the threshold range of this pass, read while the first scores are in flight
        prev_lo = prev_lo_ref[0] if has_prev_lo else 0
        jstar, _ = _pick_level(hp_ref[...], num_blocks, jnp.minimum(kk_ref[0], k))
        return prev_lo + jstar * prev_step

    def body(it, raw, counters, lo):
        s = raw.astype(jnp.int32)
        # One thermometer per token, then one counter lane per thread: the `lanes` tokens a thread holds
        # are added into the same lane by the carry-save tree (fewer counters to extract at the end).
        return _bitsliced_add(counters, _split_lanes(_thermometer(s, lo, step, min(t, 31)), lanes))

    lane_max = num_steps * lanes
    init = tuple(jnp.zeros((sub // lanes,), jnp.int32) for _ in range(lane_max.bit_length()))
    counters, lo = _stream(load, body, num_steps, steps, init, depth, setup, fence=compiled)
    _store_counts(h_ref, _extract_counts(counters, t, lane_max, span))
    lo_ref[...] = jnp.full((1,), lo, jnp.int32)


def _compact_kernel(
    kk_ref,  # [1] int32: live budget of this batch row
    len_ref,  # [1] int32: live length of this batch row
    *refs,
    num_blocks: int,
    sub: int,
    lanes: int,
    seq_len: int,
    k: int,
    fill: int,
    has_prev_lo: bool,
    depth: int,
    compiled: bool,
    blk=None,
):
    # refs: [lo_ref [NBP] int32], h_ref [NBP, T] int32 (last pass, step 1), s_ref [SPAN] int16,
    #       idx_ref [k] int32 out, sc_ref [k] int32 out, nv_ref [1] int32 out (the row's; every block writes it)
    if has_prev_lo:
        lo_ref, h_ref, s_ref, idx_ref, sc_ref, nv_ref = refs
    else:
        h_ref, s_ref, idx_ref, sc_ref, nv_ref = refs
    span = s_ref.shape[0]
    blk = _block_id(blk)
    length = len_ref[0]
    base = blk * span
    num_steps = span // sub
    steps = jnp.clip((length - base + sub - 1) // sub, 0, num_steps)
    load = _score_loader(s_ref, sub, base, seq_len)

    def setup():  # exact threshold and this block's output offsets, read while the first scores are in flight
        kk = jnp.minimum(kk_ref[0], k)
        lo = lo_ref[0] if has_prev_lo else 0
        jstar, h = _pick_level(h_ref[...], num_blocks, kk)
        nbp, t = h.shape
        col = lax.broadcasted_iota(jnp.int32, (nbp, t), 1)
        ge = jnp.sum(jnp.where(col == jstar, h, 0), axis=1)  # [NBP] per-block count of score >= thr
        gt = jnp.sum(jnp.where(col == jstar + 1, h, 0), axis=1)  # [NBP] per-block count of score > thr
        before = lax.broadcasted_iota(jnp.int32, (nbp,), 0) < blk
        tot = _sum_columns([jnp.where(before, gt, 0), jnp.where(before, ge - gt, 0), gt, ge])
        off_gt, off_eq, total_gt, total_ge = (jnp.sum(jnp.where(jnp.arange(4) == i, tot, 0)) for i in range(4))
        return lo + jstar, off_gt, total_gt + off_eq, jnp.minimum(kk, total_ge)

    r = sub // lanes
    row_iota = lanes * lax.broadcasted_iota(jnp.int32, (r,), 0)

    def body(it, raw, carry, ctx):
        # The step's tokens as `lanes` columns of [r] (column c holds tokens lanes * i + c, thread-local):
        # in-thread prefix over the columns + one scan over the [r] row totals give each token's rank, and
        # the scatters stay in the one-element-per-thread layout that Triton uses for them (no shuffles).
        thr, gt_base, eq_base, n_valid = ctx
        n_gt, n_eq = carry
        cols = _split_lanes(raw.astype(jnp.int32), lanes)
        # > thr counts in the low 16 bits, == thr in the high 16 (sub < 2^16).
        packed = [(s > thr).astype(jnp.int32) + ((s == thr).astype(jnp.int32) << 16) for s in cols]
        prefix = [None]
        for p in packed[:-1]:
            prefix.append(p if prefix[-1] is None else prefix[-1] + p)
        row_tot = packed[0] if lanes == 1 else prefix[-1] + packed[-1]
        row_ex = jnp.cumsum(row_tot) - row_tot  # packed ranks of each row's first token within the step
        tot = jnp.sum(row_tot)
        start = gt_base + n_gt, eq_base + n_eq
        rows0 = base + _multiple_of(it * sub, sub) + row_iota
        for c, (s, p) in enumerate(zip(cols, packed, strict=True)):
            ex = row_ex if prefix[c] is None else row_ex + prefix[c]
            is_gt = s > thr
            pos = jnp.where(is_gt, start[0] + (ex & 0xFFFF), start[1] + lax.shift_right_logical(ex, 16))
            take = (p != 0) & (pos < n_valid)
            if not compiled:
                pos = jnp.where(take, pos, k)  # masked lanes point past the row (dropped in interpret mode)
            plgpu.store(idx_ref.at[pos], rows0 + c, mask=take)
            plgpu.store(sc_ref.at[pos], s, mask=take)
        return n_gt + (tot & 0xFFFF), n_eq + lax.shift_right_logical(tot, 16)

    _, (_, _, _, n_valid) = _stream(
        load, body, num_steps, steps, (jnp.int32(0), jnp.int32(0)), depth, setup, fence=compiled
    )

    # Unused slots [n_valid, k): this program zero-fills its share of them.
    slots = blk * fill + lax.broadcasted_iota(jnp.int32, (fill,), 0)
    empty = (slots >= n_valid) & (slots < k)
    if not compiled:
        slots = jnp.where(empty, slots, k)
    zeros = jnp.zeros((fill,), jnp.int32)
    plgpu.store(idx_ref.at[slots], zeros, mask=empty)
    plgpu.store(sc_ref.at[slots], zeros, mask=empty)
    nv_ref[...] = jnp.full((1,), n_valid, jnp.int32)


# Wrappers
# --------------------------------------------------------------------------------------------


def _score_kernel(
    *,
    group: int,
    bits: int,
    seq_len: int,
    step: int,
    sub: int,
    chunks: int,
    depth: int | None,
    programs: int,
    csa: bool,
    csa_full_adders: int | None,
):
    """Pass 1's kernel body with its static settings bound (``depth`` None: automatic from the program count)."""
    if depth is None:
        depth = 2 if programs <= TUNING.pass1_depth2_max_programs else 1
    return functools.partial(
        _score_count_kernel,
        group=group,
        num_planes=max(1, group.bit_length()),
        bits=bits,
        seq_len=seq_len,
        step=step,
        sub=sub,
        chunks=min(chunks, sub),
        depth=depth,
        csa=csa,
        csa_full_adders=csa_full_adders,
    )


def _as_rows(q_codes, k_codes):
    """int32 views: query codes [BK, G, W] and key codes [BK, S, W]."""
    b, n, w = q_codes.shape
    kv, s = k_codes.shape[1], k_codes.shape[2]
    qc = lax.bitcast_convert_type(q_codes, jnp.int32).reshape(b * kv, n // kv, w)
    return qc, lax.bitcast_convert_type(k_codes, jnp.int32).reshape(b * kv, s, w)


def _scores_pass(
    q_codes,
    k_codes,
    lengths,
    kernel,  # pass 1's body from ``_score_kernel``
    *,
    span,
    num_thresholds,
    num_warps,
    interpret,
):
    """Pass 1: int16 scores [BK, S] and per-block counts [BK, NBP, T]."""
    b, n, w = q_codes.shape
    kv, s = k_codes.shape[1], k_codes.shape[2]
    bk, g = b * kv, n // kv
    qc, codes = _as_rows(q_codes, k_codes)
    nb = cdiv(s, span)
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
            jax.ShapeDtypeStruct((bk, _table_rows(nb), num_thresholds), jnp.int32),
        ],
        compiler_params=triton_params(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="hamming_score_count",
    )(qc, lengths, codes)
    return scores, counts


@functools.partial(jax.jit, static_argnames=("sub", "num_warps", "csa", "interpret"))
def _hamming_scores_pallas(q_codes, k_codes, *, sub=1024, num_warps=4, csa=True, interpret=False):
    b, kv, s, _ = k_codes.shape
    sub, span, _ = plan_spans(s, b * kv, sub)
    kernel = _score_kernel(
        group=q_codes.shape[1] // kv,
        bits=32 * q_codes.shape[2],
        seq_len=s,
        step=1,
        sub=sub,
        chunks=4,
        depth=None,
        programs=b * kv * cdiv(s, span),
        csa=csa,
        csa_full_adders=None,
    )
    scores, _ = _scores_pass(
        q_codes,
        k_codes,
        jnp.full((b,), s, jnp.int32),
        kernel,
        span=span,
        num_thresholds=2,
        num_warps=num_warps,
        interpret=interpret,
    )
    return scores.astype(jnp.int32).reshape(b, kv, s)


def _refine_kernels(*, nb, steps, sub2, lanes, seq_len, k, depth, compiled):
    """The bodies of the refine passes (levels 1 .. L - 1) and of the compaction, static settings bound."""
    shared = dict(num_blocks=nb, sub=sub2, lanes=lanes, seq_len=seq_len, k=k, depth=depth, compiled=compiled)
    refines = [
        functools.partial(
            _refine_kernel, prev_step=steps[level - 1], step=steps[level], has_prev_lo=level > 1, **shared
        )
        for level in range(1, len(steps))
    ]
    compact = functools.partial(_compact_kernel, fill=next_pow2(cdiv(k, nb)), has_prev_lo=len(steps) > 1, **shared)
    return refines, compact


def _one_launch_kernel(
    qc_ref,  # [BK, G, W] int32
    len_ref,  # [B] int32
    kk_ref,  # [B] int32 live budget
    codes_ref,  # [BK, S', W] int32 (S' = NB * SPAN in interpret mode, else S)
    sync_in_ref,  # [BK + 1, L] int32 zeros (aliased to sync_ref)
    s_ref,  # [BK, NB * SPAN] int16 out: scores
    *refs,
    kv: int,
    nb: int,
    span: int,
    levels: int,
    score_kernel,
    refine_kernels,
    compact_kernel,
    interpret: bool,
    max_spins: int,
):
    # refs: counts_0 .. counts_{L-1} [BK, NBP, T] int32, lo_1 .. lo_{L-1} [BK, NBP] int32, idx [BK, k] int32,
    #       sc [BK, k] int32, nv [BK] int32 (every block of a row writes the same count),
    #       sync [BK + 1, L] int32 (row r: arrivals per counting pass; [BK, 0]: stalls)
    del sync_in_ref
    counts, los = refs[:levels], refs[levels : 2 * levels - 1]
    idx_ref, sc_ref, nv_ref, sync_ref = refs[2 * levels - 1 :]
    bk = s_ref.shape[0]
    items = bk * nb
    pid = pl.program_id(0)
    phase = pid // items  # programs [p * items, (p + 1) * items) run pass p for every (row, block), row-major
    item = pid - phase * items
    r = item // nb
    blk = item - r * nb
    row_len = _Window(len_ref, (), r // kv, 1)
    row_kk = _Window(kk_ref, (), r // kv, 1)
    start = _multiple_of(blk * span, span)
    scores = _Window(s_ref, (r,), start, span)
    nbp = counts[0].shape[1]
    table = [_Window(c, (r,), 0, nbp) for c in counts]  # [NBP, T] of this row
    block_out = [_Window(c, (r, blk), 0, c.shape[2]) for c in counts]  # [T] of this (row, block)
    stall = (bk, 0)

    @pl.when(phase == 0)
    def _():
        codes = _Window(codes_ref, (r,), start, span)
        score_kernel(_Window(qc_ref, (r,), 0, qc_ref.shape[1]), row_len, codes, scores, block_out[0], blk=blk)
        sync_count(sync_ref, (r, 0), interpret)

    def after(level):  # every program of pass level - 1 of this row has stored its counts (and scores)
        wait_count(sync_ref, (r, level - 1), nb, stall, interpret, max_spins)
        return [] if level == 1 else [_Window(los[level - 2], (r,), 0, nbp)]

    for level, refine in enumerate(refine_kernels, start=1):

        @pl.when(phase == level)
        def _(level=level, refine=refine):
            prev = after(level)
            refine(
                row_kk,
                row_len,
                *prev,
                table[level - 1],
                scores,
                block_out[level],
                _Window(los[level - 1], (r,), blk, 1),
                blk=blk,
            )
            sync_count(sync_ref, (r, level), interpret)

    @pl.when(phase == levels)
    def _():
        prev = after(levels)
        k = idx_ref.shape[1]
        out = _Window(idx_ref, (r,), 0, k), _Window(sc_ref, (r,), 0, k), _Window(nv_ref, (), r, 1)
        compact_kernel(row_kk, row_len, *prev, table[levels - 1], scores, *out, blk=blk)


@functools.partial(
    jax.jit,
    static_argnames=(
        "k",
        "block_s",
        "num_thresholds",
        "num_warps",
        "max_blocks",
        "target_programs",
        "chunks",
        "pass1_depth",
        "depth",
        "score_lanes",
        "csa",
        "csa_full_adders",
        "one_launch",
        "max_spins",
        "interpret",
    ),
)
def hamming_topk_rows_stats(
    q_codes,  # [B, N, W] uint32
    k_codes,  # [B, K, S, W] uint32
    lengths,  # [B] int32
    budget,  # [B] int32 live budget (clamped to k)
    *,
    k: int,
    block_s: int | None = None,
    num_thresholds: int = TUNING.num_thresholds,
    num_warps: int | None = None,
    max_blocks: int = TUNING.max_blocks,
    target_programs: int = TUNING.target_programs,
    chunks: int = TUNING.chunks,
    pass1_depth: int | None = TUNING.pass1_depth,
    depth: int = TUNING.score_depth,
    score_lanes: int = TUNING.score_lanes,
    csa: bool = True,
    csa_full_adders: int | None = None,
    one_launch: bool | None = TUNING.one_launch,
    max_spins: int = MAX_SPINS,
    interpret: bool = False,
):
    """``hamming_topk_rows`` plus the one-launch kernel's stall count (int32 scalar; 0 for three launches): the
    waits that gave up after ``max_spins`` polls. Nonzero means the result is wrong (see ``wait_count``); it cannot
    happen while the GPU dispatches programs in id order, and the compiled tests and ``bench kernels`` check it.
    ``hamming_topk_rows`` drops it (checking it inside a decode step would need a host round trip)."""
    b, n, w = q_codes.shape
    kv, s = k_codes.shape[1], k_codes.shape[2]
    bk, bits = b * kv, 32 * w
    t = num_thresholds
    t_real = min(t, 31)  # column 31 of a 32-wide count table stays 0 (masks have 31 usable bits)
    block_s, num_warps = default_grid(s, bk, block_s, num_warps, max_blocks, target_programs, one_launch)
    sub, span, nb = plan_spans(s, bk, block_s, max_blocks, target_programs)
    # Refine / compact stream 2-byte scores: wider steps (2 * sub tokens, one 16-byte load per thread).
    sub2 = min(span, 2 * sub)
    lanes = max(1, min(score_lanes, sub2 // (32 * num_warps)))  # scores per thread and step
    nbp = _table_rows(nb)
    steps = level_steps((n // kv) * bits + 1, t_real)
    levels = len(steps)
    lengths = lengths.astype(jnp.int32)
    budget = budget.astype(jnp.int32)
    one_launch = launches_once(one_launch, bk * nb)
    score_kernel = _score_kernel(
        group=n // kv,
        bits=bits,
        seq_len=s,
        step=steps[0],
        sub=sub,
        chunks=chunks,
        depth=pass1_depth,
        programs=bk * nb,
        csa=csa,
        csa_full_adders=csa_full_adders,
    )
    refines, compact = _refine_kernels(
        nb=nb, steps=steps, sub2=sub2, lanes=lanes, seq_len=s, k=k, depth=depth, compiled=not interpret
    )
    params = triton_params(num_warps=num_warps, num_stages=2)
    table = jax.ShapeDtypeStruct((bk, nbp, t), jnp.int32)
    per_block = jax.ShapeDtypeStruct((bk, nbp), jnp.int32)
    out_rows = [jax.ShapeDtypeStruct((bk, k), jnp.int32)] * 2
    n_valid = jax.ShapeDtypeStruct((bk,), jnp.int32)  # written whole by the compaction: no slice after the kernel

    if one_launch:
        qc, codes = _as_rows(q_codes, k_codes)
        if interpret and nb * span != s:  # interpret mode clamps out-of-range slices; the GPU masks them
            codes = jnp.pad(codes, ((0, 0), (0, nb * span - s), (0, 0)))
        kernel = functools.partial(
            _one_launch_kernel,
            kv=kv,
            nb=nb,
            span=span,
            levels=levels,
            score_kernel=score_kernel,
            refine_kernels=refines,
            compact_kernel=compact,
            interpret=interpret,
            max_spins=max_spins,
        )
        sync = jax.ShapeDtypeStruct((bk + 1, levels), jnp.int32)
        out_shape = [jax.ShapeDtypeStruct((bk, nb * span), jnp.int16), *[table] * levels, *[per_block] * (levels - 1)]
        outs = pl.pallas_call(
            kernel,
            grid=((levels + 1) * bk * nb,),
            out_shape=[*out_shape, *out_rows, n_valid, sync],
            input_output_aliases={4: len(out_shape) + 3},
            compiler_params=params,
            interpret=interpret,
            name="hamming_topk_one_launch",
        )(qc, lengths, budget, codes, jnp.zeros(sync.shape, jnp.int32))
        idx, sc, nv, sync_out = outs[-4:]
        return idx, sc, nv, sync_out[bk, 0]

    scores, counts = _scores_pass(
        q_codes, k_codes, lengths, score_kernel, span=span, num_thresholds=t, num_warps=num_warps, interpret=interpret
    )
    row_spec = pl.BlockSpec((1,), lambda r, i: (r // kv,))
    counts_spec = pl.BlockSpec((None, nbp, t), lambda r, i: (r, 0, 0))
    lo_in_spec = pl.BlockSpec((None, nbp), lambda r, i: (r, 0))
    score_spec = pl.BlockSpec((None, span), lambda r, i: (r, i))
    block_spec = pl.BlockSpec((None, 1), lambda r, i: (r, i))
    lo = None
    for level, refine in enumerate(refines, start=1):
        extra = [] if lo is None else [lo]
        counts, lo = pl.pallas_call(
            refine,
            grid=(bk, nb),
            in_specs=[row_spec, row_spec] + ([] if lo is None else [lo_in_spec]) + [counts_spec, score_spec],
            out_specs=[pl.BlockSpec((None, None, t), lambda r, i: (r, i, 0)), block_spec],
            out_shape=[table, per_block],
            compiler_params=params,
            interpret=interpret,
            name=f"hamming_refine_{level}",
        )(budget, lengths, *extra, counts, scores)

    extra = [] if lo is None else [lo]
    out_row_spec = pl.BlockSpec((None, k), lambda r, i: (r, 0))
    idx, sc, nv = pl.pallas_call(
        compact,
        grid=(bk, nb),
        in_specs=[row_spec, row_spec] + ([] if lo is None else [lo_in_spec]) + [counts_spec, score_spec],
        out_specs=[out_row_spec, out_row_spec, pl.BlockSpec((1,), lambda r, i: (r,))],
        out_shape=[*out_rows, n_valid],
        compiler_params=params,
        interpret=interpret,
        name="hamming_compact",
    )(budget, lengths, *extra, counts, scores)
    return idx, sc, nv, jnp.int32(0)


def hamming_topk_rows(q_codes, k_codes, lengths, budget, **kwargs):
    """Pallas top-k; returns (indices [BK, k] int32, scores [BK, k] int32, n_valid [BK] int32).

    Arguments: q_codes [B, N, W] uint32, k_codes [B, K, S, W] uint32, lengths [B] int32, budget [B] int32 (live
    budget, clamped to ``k``); keywords (static):
    ``block_s`` is the number of tokens per inner step of a program (``chunks`` loads of
    ``block_s / chunks`` tokens; 1 token per thread and chunk at block_s = chunks * 32 * num_warps); it and
    ``num_warps`` default to ``default_grid``'s choice (1024 / 8, or 512 / 4 for small three-launch grids;
    ``TopKTuning``).
    ``pass1_depth`` / ``depth``: steps whose loads are in flight together in pass 1 / in the refine and
    compaction passes (powers of two; 1 = one-step prefetch, as before; None = automatic for pass 1).
    ``max_blocks`` / ``target_programs``: the grid's blocks per row and the programs it aims for (``plan_spans``).
    ``score_lanes``: at most this many scores per thread and step are folded into one counter lane /
    ranked in-thread (1 = one lane per score and one block-wide scan per step, as before).
    ``csa``: pass 1 scores each token with one carry-save tree over all its words and planes (``_csa_scores``);
    False = one popcount per word and plane, summed per plane (the previous path, kept for comparison).
    ``csa_full_adders``: at most this many full adders per token in that tree (None: every one that pays off
    under ``CSA_COSTS``); fewer keep more popcounts and fewer LOP3s, for when POPC is not the bottleneck.
    ``one_launch``: all passes in one kernel launch (``_one_launch_kernel``) instead of one launch per pass; None:
    when a pass has more than ``TUNING.one_launch_min_programs`` programs (``TopKTuning.one_launch``).
    At most 31 of the ``num_thresholds`` (a power of two) are used: one bit each in an int32 mask.
    Slots ``>= n_valid`` of a row hold index 0 and score 0. This is the form that ``sparse_decode_attention_rows``
    consumes without materialising a boolean mask.
    """
    idx, sc, nv, _ = hamming_topk_rows_stats(q_codes, k_codes, lengths, budget, **kwargs)
    return idx, sc, nv


def hamming_scores(
    q_codes,  # [B, N, W] uint32
    k_codes,  # [B, K, S, W] uint32
    *,
    implementation: str | None = None,
    interpret: bool = False,
    csa: bool = True,
):
    """int32 [B, K, S] group-summed XNOR-popcount scores (``csa``: see ``hamming_topk_rows``)."""
    if resolve_implementation(implementation) == "xla":
        return hamming_scores_reference(q_codes, k_codes)
    return _hamming_scores_pallas(q_codes, k_codes, csa=csa, interpret=interpret)


def hamming_topk(
    q_codes,  # [B, N, W] uint32
    k_codes,  # [B, K, S, W] uint32
    lengths,  # [B] int32
    k: int,
    budget=None,  # [B] int32 <= k: live budget; None means k
    *,
    implementation: str | None = None,
    interpret: bool = False,
    block_s: int | None = None,
    num_thresholds: int = TUNING.num_thresholds,
    max_blocks: int = TUNING.max_blocks,
    num_warps: int | None = None,
    csa: bool = True,
    one_launch: bool | None = TUNING.one_launch,
) -> TopK:
    """Per (batch row, KV head) the ``k`` highest-scoring of the first ``lengths[b]`` tokens.

    Exact up to ties. Only the first ``min(budget[b], lengths[b])`` slots are valid; the others
    hold index 0 and score 0 (safe to gather). The tuning knobs are those of ``hamming_topk_rows``.
    """
    b, kv = k_codes.shape[:2]
    lengths = jnp.asarray(lengths, jnp.int32)
    if resolve_implementation(implementation) == "xla":
        return hamming_topk_reference(q_codes, k_codes, lengths, k, budget)
    live = kernel_budget(budget, b, k)
    idx, sc, nv = hamming_topk_rows(
        q_codes,
        k_codes,
        lengths,
        live,
        k=k,
        block_s=block_s,
        num_thresholds=num_thresholds,
        max_blocks=max_blocks,
        num_warps=num_warps,
        csa=csa,
        one_launch=one_launch,
        interpret=interpret,
    )
    valid = jnp.arange(k)[None, :] < nv[:, None]
    return TopK(idx.reshape(b, kv, k), sc.reshape(b, kv, k), valid.reshape(b, kv, k))
