"""The bit-slice / popcount arithmetic of the top-k kernels: scores of packed codes, thermometer masks and
bit-sliced counters. Plain ``jnp`` / ``lax`` on [Q] int32 vectors, traced inside the Pallas kernels.

Counting (all passes): each token's score becomes a thermometer mask (bit j set iff
score >= lo + j * step, at most 31 thresholds), and the masks are added into bit-sliced per-lane
counters with carry-save adders (~3 logic ops per token whatever T); the per-threshold totals are
extracted once per program (byte-lane SWAR sums, all columns in one cross-warp reduction). The
refine pass adds the 8 scores that a thread loads with one 16-byte load into the same counter lane,
so a thread extracts one lane instead of eight.

The group sum of popcounts is computed with bit planes of the per-bit query counts: with
c_b = #query heads of the group whose bit b is 1 and M = 2^P - 1 >= G, P = bit_length(G),
``score = sum_p 2^p popcount(~(plane_p ^ k)) - (M - G) * (bits - popcount(k))``: P popcounts per word
instead of G (popcount issues at a quarter of the integer rate on Hopper). ``csa=False`` does exactly
this (P * W popcounts per token, summed over the [Q, W] tile's words per plane).

``csa=True`` (default) adds the words and planes with carry-save adders before counting. Bit b of a
token contributes v_b = c_b if its key bit is 1 else G - c_b, so plane p of v is ``g_p ^ (k & d_p)``
(g = planes of G - c, d = planes of c ^ (G - c), per query word; one LOP3) and, for G = 2^P - 1
(1, 3, 7), ``k ^ g_p`` with g_p = ~c_p: no ``(M - G) popcount(k)`` term for any G. The P * W words
(weight 2^p) form the columns of one tree (``csa_compress``): a full adder turns three words of a column
into their xor (same weight) and majority (next weight), popcount(a) + popcount(b) + popcount(c) =
popcount(sum) + 2 popcount(carry), so each one saves a popcount for ~2.5 LOP3s. The key words are
loaded as [Q, <= 4] tiles (16 B per token, one thread's row) and split into [Q] vectors, so there is no
per-word reduction. POPCs per token in the sm_90 SASS (csa=False -> True): at 128 bits G = 7 12 -> 7,
G = 4 16 -> 5, G = 8 20 -> 7, G = 1 4 -> 3; at 256 bits G = 7 24 -> 8, G = 8 40 -> 8, for 2-3 LOP3s
per popcount saved. ``csa_full_adders`` caps the adders (fewer LOP3s, more popcounts) for when the
integer pipe, not POPC, is the bottleneck.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import next_pow2


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


def _full_adder(a, b, c):
    """Per bit a + b + c = sum + 2 * carry: (a ^ b ^ c, majority(a, b, c))."""
    ab = a ^ b
    return ab ^ c, (a & b) | (c & ab)


def _half_adder(a, b):
    """Per bit a + b = sum + 2 * carry: (a ^ b, a & b)."""
    return a ^ b, a & b


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
                total, carry = _full_adder(col.pop(0), col.pop(0), col.pop(0))
            else:
                total, carry = _half_adder(col.pop(0), col.pop(0))
            col.append(total)
            if lv + 1 < levels:
                cols[lv + 1].append(carry)
    return tuple(c[0] for c in cols)


def _sum_columns(cols):
    """Column sums of ``len(cols)`` [Q] int32 tensors as one [Q, C] reduction (C = next power of two).

    One cross-warp reduction instead of one per column: the columns are joined pairwise along a new
    last axis (``tt.join``, thread-local) so that each thread holds all C values of its lanes.
    """
    c = next_pow2(len(cols))
    vals = list(cols) + [jnp.zeros_like(cols[0])] * (c - len(cols))
    while len(vals) > 1:  # value i ends at flat column i: pairs (j, j + h) nest with j as the faster index
        h = len(vals) // 2
        vals = [jnp.stack([vals[j], vals[j + h]], axis=-1) for j in range(h)]
    q = cols[0].shape[0]
    return jnp.sum(vals[0].reshape(q, c), axis=0)  # [C]


def _extract_counts(
    counters,  # tuple of L [Q] int32 bit-sliced counters
    t: int,
    lane_max: int,
    total_max: int,
):
    """Per-threshold sums over the lanes of the bit-sliced counts, as ``[(offset, values)]`` slices of the [T] row.

    ``lane_max`` bounds a lane's count and ``total_max`` the sum over lanes. Byte lanes when both fit: y_k holds
    the counts of thresholds k, k+8, k+16, k+24 in its bytes; column c = k + 8 * (c // 8) keeps thresholds c and
    c + 16 in its 16-bit halves; all columns are summed by one reduction.
    """
    if lane_max <= 255 and total_max <= 0xFFFF:
        ncols = min(t, 16)
        ys = {}
        cols = []
        for c in range(ncols):
            k = c % 8
            if k not in ys:
                y = None
                for lv, cnt in enumerate(counters):
                    term = lax.shift_right_logical(cnt, k) & 0x01010101
                    term = term << lv if lv else term
                    y = term if y is None else y + term
                ys[k] = y
            cols.append(lax.shift_right_logical(ys[k], 8 * (c // 8)) & 0x00FF00FF)
        tot = _sum_columns(cols)
        out = [(0, tot & 0xFFFF)]
        if t > 16:
            out.append((16, lax.shift_right_logical(tot, 16)))
        return out
    cols = []
    for j in range(min(t, 31)):
        v = None
        for lv, cnt in enumerate(counters):
            term = lax.shift_right_logical(cnt, j) & 1
            term = term << lv if lv else term
            v = term if v is None else v + term
        cols.append(v)
    return [(0, _sum_columns(cols))]  # min(t, 31) columns padded to t (a power of two)


def _split_lanes(x, lanes: int):
    """[N] -> ``lanes`` tensors [N / lanes]: element i of piece c is x[lanes * i + c].

    With ``lanes`` = the elements a thread holds contiguously (8 for 16-byte loads of int16) every piece
    has one element per thread, split without data movement (reshape + ``tt.split``).
    """
    if lanes == 1:
        return [x]
    n = x.shape[0]
    parts = lax.split(x.reshape(n // lanes, lanes), (1,) * lanes, axis=1)
    return [p.reshape(n // lanes) for p in parts]


def _query_planes(
    q_ref,  # [G, W] int32 query codes of the group
    group: int,
    num_planes: int,
):
    """Bit-sliced sum of the group's query words: planes[p] holds bit p of the per-bit count c_b."""
    return _bitsliced_count([q_ref[j, :] for j in range(group)], num_planes)  # [W] each


def _bitsliced_count(words, num_planes: int):
    """Bit-sliced count of the set bits of ``words`` per bit position: planes[p] holds bit p of the count."""
    planes = [None] * num_planes
    for x in words:
        carry = x
        for p in range(num_planes):
            if carry is None:
                break
            if planes[p] is None:
                planes[p], carry = carry, None
            else:
                planes[p], carry = planes[p] ^ carry, planes[p] & carry
    zero = words[0] & 0
    return [zero if x is None else x for x in planes]


def _query_word_planes(
    q,  # [G, W] int32 query codes of the group: a kernel ref (scalar loads) or an array
    group: int,
    num_planes: int,
):
    """Per word w the selector planes of the CSA path: ``sel[w][p] = (g_p, d_p)`` (scalars).

    With c_b = #query heads of the group whose bit b is 1, a token's bit b contributes v_b = c_b if its
    key bit is 1 else G - c_b. g_p is plane p of G - c (the bit-sliced count of the zeros) and d_p = c_p ^ g_p,
    so that plane p of v is ``g_p ^ (k & d_p)`` (one LOP3). For G = 2^P - 1, G - c = ~c and d_p = ~0:
    d is None and plane p of v is ``k ^ g_p``.
    """
    full = group == (1 << num_planes) - 1
    sel = []
    for w in range(q.shape[1]):
        qw = [q[j, w] for j in range(group)]
        zeros = _bitsliced_count([~x for x in qw], num_planes)
        if full:
            sel.append([(zeros[p], None) for p in range(num_planes)])
        else:
            ones = _bitsliced_count(qw, num_planes)
            sel.append([(zeros[p], ones[p] ^ zeros[p]) for p in range(num_planes)])
    return sel


# Cost model of ``csa_compress`` in half issue slots of the integer pipe per token, calibrated on the sm_90 SASS of
# the score kernel (Triton 3.8 + ptxas, G = 3..8, 128-bit codes): a full adder costs ~2.5 slots (LOP3s, after ptxas
# fused the xors and the majority), a half adder ~2, a popcount ~4.5 (POPC issues at a quarter of the LOP3 rate on
# Hopper, plus its share of the adds that combine the counts). A half adder + the full adder it enables cost as much
# as the popcount they save, so half adders are used only where one enables two or more full adders.
CSA_COSTS = (5, 4, 9)  # (full adder, half adder, popcount)


class _CsaStep(NamedTuple):
    full: int  # full adders in this column
    half: bool  # then one half adder on the two words left


def _csa_plan(counts, costs=CSA_COSTS, max_full: int | None = None) -> tuple[_CsaStep, ...]:
    """Per column (weight 1 up) the adders of the cheapest compression of columns of ``counts`` words.

    Full adders while a column holds three or more words (at most ``max_full`` in all, lowest columns first);
    a half adder on a column left with two words where that lowers the total cost. Exhaustive over those
    half-adder choices; ties go to fewer adders.
    """
    full_cost, half_cost, pop_cost = costs
    best = None

    def rec(e, carry, budget, plan, cost, adders):
        nonlocal best
        n = (counts[e] if e < len(counts) else 0) + carry
        if e >= len(counts) and n == 0:
            if best is None or (cost, adders) < best[0]:
                best = ((cost, adders), tuple(plan))
            return
        fa = max(0, (n - 1) // 2)  # n -> n - 2 * fa words (1 or 2), fa carries into the next column
        fa = fa if budget is None else min(fa, budget)
        rest = None if budget is None else budget - fa
        left = n - 2 * fa
        base = cost + full_cost * fa
        rec(e + 1, fa, rest, plan + [_CsaStep(fa, False)], base + pop_cost * left, adders + fa)
        if left == 2 and rest != 0:
            rec(e + 1, fa + 1, rest, plan + [_CsaStep(fa, True)], base + half_cost + pop_cost, adders + fa + 1)

    rec(0, 0, max_full, [], 0, 0)
    return best[1]


def csa_compress(columns, *, costs=CSA_COSTS, max_full_adders: int | None = None):
    """Carry-save compression of weighted words for a sum of popcounts.

    ``columns[e]`` lists words of weight 2^e (int32 arrays of one shape, or anything with ``^ & |``). Returns
    ``[(e, word)]``, fewer words, with the same weighted popcount sum, bit for bit:
    ``sum_e 2^e sum_{x in columns[e]} popcount(x) == sum_{(e, x)} 2^e popcount(x)``.

    A full adder replaces three words a, b, c of weight 2^e by their sum a ^ b ^ c (weight 2^e) and their
    majority (a & b) | (c & (a ^ b)) (weight 2^(e+1)), since per bit a + b + c = sum + 2 * carry; a half
    adder replaces two by a ^ b and a & b. Columns are compressed from weight 1 up, carries joining the next
    column: full adders while a column holds three or more words (each saves a popcount for two LOP3s, ~2.5
    in the sm_90 SASS), then a half adder on a column left with two words where its carry lets the columns
    above save more popcounts than it costs. The plan (``_csa_plan``) depends only on the column sizes, ``costs`` (see
    ``CSA_COSTS``) and ``max_full_adders`` (None: all that pay off; fewer trade LOP3s back for popcounts).
    E.g. 3 columns of 4 words (G = 7 query heads, 128-bit codes): 5 full adders, 7 popcounts instead of 12.
    """
    plan = _csa_plan([len(c) for c in columns], costs, max_full_adders)
    cols = [list(c) for c in columns] + [[] for _ in range(len(plan) - len(columns))]
    out = []
    for e, (col, step) in enumerate(zip(cols, plan, strict=True)):
        carries = []
        for _ in range(step.full):
            total, carry = _full_adder(col.pop(0), col.pop(0), col.pop(0))
            col.append(total)
            carries.append(carry)
        if step.half:
            total, carry = _half_adder(*col)
            col = [total]
            carries.append(carry)
        if carries:
            cols[e + 1].extend(carries)
        out.extend((e, x) for x in col)
    return out


def _weighted_popcount(terms):
    """``sum_{(e, x)} 2^e popcount(x)`` as int32 (Horner over the distinct weights: one shift-add each)."""
    by_e = {}
    for e, x in terms:
        pc = lax.population_count(x)
        by_e[e] = pc if e not in by_e else by_e[e] + pc
    es = sorted(by_e, reverse=True)
    acc = by_e[es[0]]
    for hi, lo in zip(es, es[1:], strict=False):
        acc = (acc << (hi - lo)) + by_e[lo]
    return acc << es[-1] if es[-1] else acc


def _csa_scores(
    words,  # W [Q] int32: word w of each token's key code
    sel,  # _query_word_planes(...)
    max_full_adders: int | None = None,
):
    """[Q] int32 group scores ``sum_j popcount(~(q_j ^ k))`` by one carry-save tree over all words and planes.

    Column p of the tree holds plane p of the per-bit values v_b of every word (``_query_word_planes``).
    """
    cols = [[] for _ in sel[0]]
    for k, planes in zip(words, sel, strict=True):
        for p, (g, d) in enumerate(planes):
            cols[p].append(k ^ g if d is None else g ^ (k & d))
    return _weighted_popcount(csa_compress(cols, max_full_adders=max_full_adders))


def _split_words(
    tile,  # [Q, V] int32
):
    """V [Q] tensors, the columns of ``tile`` (thread-local when a thread holds its rows' V words)."""
    q, v = tile.shape
    if v == 1:
        return [tile.reshape(q)]
    return [x.reshape(q) for x in lax.split(tile, (1,) * v, axis=1)]
