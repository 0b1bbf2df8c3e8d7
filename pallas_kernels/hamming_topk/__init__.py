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
   Every row < S gets a score: -1 past the row's length, also in the sub-blocks it skips.
2. ``_refine_kernel`` (0 or more): reads the previous per-block counts, narrows the range, counts
   the scores of its block against T finer thresholds.
3. ``_compact_kernel``: exact threshold from the last counts, per-block offsets (prefix over the
   blocks' counts), in-block ranks, scatter of indices and scores; fills the unused slots with
   index 0 / score 0.

One launch (``one_launch``; the default for grids of more than 264 programs per pass): the same three bodies
run in one 1-D grid of (L + 1) x BK x NB programs, pass p on programs [p * BK * NB, (p + 1) * BK * NB) in row-major
(row, block) order. A program of pass p >= 1 first waits until all NB programs of pass p - 1 of its row have arrived
(``_common.sync_count`` / ``wait_count``: CTA barrier + acq_rel atomic on the producer side, bounded spin on the
consumer side). It only ever waits on lower program ids, which the GPU dispatches first, so it needs no
co-residency of the grid (the forward-progress argument of decoupled look-back scans), and interpret mode, which
runs the programs in id order, never waits (the tests check that with one poll). Stores and loads go through
``_Window``s of whole arrays. Measured: it drops two launch ramps and gaps but not the passes' latency chains
(count table -> threshold -> score stream -> counts -> barrier); it gains 4-8 % on large grids and loses at
batch 1 / 128K, hence the threshold (numbers in docs/kernels.md).

Bytes: codes (16 B/token/head at 128 bits) once + int16 scores written once and read once per
later pass (2 B each) + k indices and scores out.

Modules: ``reference`` (the ``jnp`` references), ``plan`` (the static launch plan and its tuning constants,
``TopKTuning``), ``arithmetic`` (the bit-slice / popcount arithmetic: counting, bit planes, carry-save adders) and
``kernels`` (the Pallas kernels and their wrappers).
"""

from pallas_kernels.hamming_topk.arithmetic import CSA_COSTS, csa_compress
from pallas_kernels.hamming_topk.kernels import hamming_scores, hamming_topk, hamming_topk_rows, hamming_topk_rows_stats
from pallas_kernels.hamming_topk.plan import (
    ONE_LAUNCH,
    ONE_LAUNCH_MIN_PROGRAMS,
    PASS1_DEPTH,
    PASS1_DEPTH2_MAX_PROGRAMS,
    SCORE_DEPTH,
    SCORE_LANES,
    SMALL_GRID_SPAN,
    TUNING,
    TopKTuning,
    default_grid,
    launches_once,
    level_steps,
    plan_spans,
)
from pallas_kernels.hamming_topk.reference import TopK, hamming_scores_reference, hamming_topk_reference, kernel_budget

__all__ = [
    "CSA_COSTS",
    "ONE_LAUNCH",
    "ONE_LAUNCH_MIN_PROGRAMS",
    "PASS1_DEPTH",
    "PASS1_DEPTH2_MAX_PROGRAMS",
    "SCORE_DEPTH",
    "SCORE_LANES",
    "SMALL_GRID_SPAN",
    "TUNING",
    "TopK",
    "TopKTuning",
    "csa_compress",
    "default_grid",
    "hamming_scores",
    "hamming_scores_reference",
    "hamming_topk",
    "hamming_topk_reference",
    "hamming_topk_rows",
    "hamming_topk_rows_stats",
    "kernel_budget",
    "launches_once",
    "level_steps",
    "plan_spans",
]
