"""The static launch plan of the top-k's counting passes: the threshold levels, the grid (``plan_spans``,
``default_grid``), one launch or three (``launches_once``), and the tuning constants behind them (``TopKTuning``).

The measurements behind the constants are in docs/kernels.md ("Top-k tuning measurements").
"""

from __future__ import annotations

import dataclasses

from pallas_kernels._common import cdiv, next_pow2


@dataclasses.dataclass(frozen=True)
class TopKTuning:
    """The top-k's tuning constants; ``TUNING`` holds their defaults, which the kernels' keyword defaults use."""

    # Steps (of ``block_s`` tokens) whose code loads are in flight together in pass 1, and steps (of
    # 2 * ``block_s`` int16 scores) in the refine / compaction passes. Registers per thread grow with both:
    # pass 1 at depth 2 needs ~100 registers (2 programs of 8 warps per SM), at depth 1 ~56 (4 per SM), so
    # the default (None) is depth 2 only while the grid fits 2 programs per SM of an H100 (132 SMs).
    pass1_depth: int | None = None
    pass1_depth2_max_programs: int = 2 * 132
    score_depth: int = 4
    # All passes in one launch (``_one_launch_kernel``) instead of one launch per pass: True, False, or None = when
    # a pass has more than ``one_launch_min_programs`` programs. One launch saves two launch ramps and gaps on large
    # grids but loses on small ones (batch 1 / 128K).
    one_launch: bool | None = None
    one_launch_min_programs: int = 2 * 132
    # Step and warps when the caller gives neither (``default_grid``): ``block_s``-token steps with ``num_warps``
    # warps, except for grids that stay three launches with at most ``small_grid_span`` tokens per program, which
    # run ``small_block_s``-token steps with ``small_num_warps`` warps (twice the steps per program, twice the
    # programs per SM): shorter passes there, slower on longer spans and on one-launch grids.
    block_s: int = 1024
    num_warps: int = 8
    small_grid_span: int = 2048
    small_block_s: int = 512
    small_num_warps: int = 4
    # At most the tokens a thread holds contiguously in a 16-byte load of int16 scores: the refine pass folds
    # a thread's scores of a step into one counter lane and the compaction ranks them in-thread.
    score_lanes: int = 8
    num_thresholds: int = 32  # per counting pass (a power of two; at most 31 are used)
    max_blocks: int = 64  # S-blocks per row at most (``plan_spans``)
    target_programs: int = 528  # programs per pass the grid aims for (about 4 per H100 SM)
    chunks: int = 4  # loads per pass-1 step


TUNING = TopKTuning()
# The constants under their earlier names.
PASS1_DEPTH = TUNING.pass1_depth
PASS1_DEPTH2_MAX_PROGRAMS = TUNING.pass1_depth2_max_programs
SCORE_DEPTH = TUNING.score_depth
ONE_LAUNCH = TUNING.one_launch
ONE_LAUNCH_MIN_PROGRAMS = TUNING.one_launch_min_programs
SMALL_GRID_SPAN = TUNING.small_grid_span
SCORE_LANES = TUNING.score_lanes


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


def launches_once(one_launch: bool | None, programs: int) -> bool:
    """Whether the top-k runs all passes in one launch: ``one_launch``, or (None) more than
    ``TUNING.one_launch_min_programs`` programs per pass."""
    return programs > TUNING.one_launch_min_programs if one_launch is None else one_launch


def default_grid(
    seq_len: int,
    rows: int,
    block_s: int | None = None,
    num_warps: int | None = None,
    max_blocks: int = TUNING.max_blocks,
    target_programs: int = TUNING.target_programs,
    one_launch: bool | None = TUNING.one_launch,
) -> tuple[int, int]:
    """(block_s, num_warps) with the caller's Nones filled in (the rule: ``TopKTuning``; its numbers: docs/kernels.md).

    Only when both are None and the launch plan is left automatic can the rule pick 512-token steps with 4 warps:
    a caller who fixes either one gets the other from the plain default (``TUNING.block_s`` / ``TUNING.num_warps``)."""
    if block_s is None and num_warps is None:
        span = plan_spans(seq_len, rows, TUNING.block_s, max_blocks, target_programs)[1]
        nb_small = plan_spans(seq_len, rows, TUNING.small_block_s, max_blocks, target_programs)[2]
        if span <= TUNING.small_grid_span and not launches_once(one_launch, rows * nb_small):
            return TUNING.small_block_s, TUNING.small_num_warps
    return (TUNING.block_s if block_s is None else block_s), (TUNING.num_warps if num_warps is None else num_warps)


def _table_rows(num_blocks: int) -> int:
    """Rows of the per-block count tables: a power of two, and at least 2. A one-row table crashed the GPU's
    Triton compiler (segfault) in the refine/compaction passes' table reductions; padded rows are masked."""
    return max(2, next_pow2(num_blocks))


def plan_spans(
    seq_len: int,
    rows: int,
    sub: int,
    max_blocks: int = TUNING.max_blocks,
    target_programs: int = TUNING.target_programs,
):
    """(sub, span, num_blocks): programs stream ``span`` tokens in ``sub``-token steps.

    Few enough blocks per row that every program can read the whole [blocks, T] count table of
    the previous pass cheaply, and enough programs (about 4 per H100 SM) to keep HBM busy.
    """
    sub = min(sub, next_pow2(seq_len))
    want_blocks = min(max_blocks, max(1, cdiv(target_programs, rows)), cdiv(seq_len, sub))
    span = sub * cdiv(cdiv(seq_len, want_blocks), sub)
    span = next_pow2(span) if span > sub else sub
    return sub, span, cdiv(seq_len, span)
