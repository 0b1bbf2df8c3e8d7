"""Shared helpers for the Pallas kernels: backend selection, interpret flag, Triton compiler params,
and the flash-decoding (split-k) pieces of the dense and the sparse decode-attention kernels.

Every public op in this package takes ``implementation="xla" | "pallas" | None`` and ``interpret``:
``None`` means Pallas on GPU and the pure-XLA reference elsewhere. Tests force ``"pallas"`` and run
the kernels in interpret mode on CPU (see :func:`default_interpret`).

Split-k merge (:func:`split_k_attention`). Axis legend: BK rows (batch x KV head), C parts per row,
G real query heads of a row, GP >= G padded rows of the dot tile, H head_dim. Program (r, c) of a
grid (BK, C) ends with an unnormalised partial o [GP, H], m [GP], l [GP]; only the G real rows are
stored, into whole-row buffers o [BK, C, G, H], m / l [BK, C, G] f32. ``combine`` picks the merge:

- ``"atomic"``: the last program of a row to finish merges the row, in the same launch.
  Each program stores its partial, then a CTA barrier (``bar.sync``), then one thread does
  ``old = atomic_add(count[r], 1)`` (``atom.add.acq_rel.gpu``: Triton executes a scalar atomic on
  one thread and hands ``old`` to the others through shared memory behind a barrier). The program
  that gets ``old == C - 1`` passes another CTA barrier and reads all C partials of the row.
  Memory ordering: every thread's partial stores precede the first ``bar.sync``, which precedes the
  release half of the atomic in the program order of the thread that issues it; PTX release is
  cumulative, so all of the CTA's stores (not only that thread's) are ordered before its counter
  update. The counter's RMWs form one chain, so the atomic that reads C - 1 has read (transitively)
  from every other program's release and its acquire synchronises with all of them; the barrier
  after it orders that acquire before every thread's loads of the partials. This is the pattern of
  CUTLASS's split-k serial reduction and of cooperative-groups grid sync (``__syncthreads`` then a
  fenced atomic by one thread), with the fence folded into the acq_rel atomic. The merge loads are
  ``volatile`` (``ld.volatile``, served by L2: no L1 line of this SM can be stale; the acquire
  already guarantees it in the model, this costs nothing here and does not rely on that). The
  counters come from a ``jnp.zeros`` input aliased to an output: fresh zeros per call, no reset.
  With many parts the merge takes two levels (:func:`merge_group_size`): the last program of each
  group of T consecutive parts merges the group into a group partial (stored the same way: stores,
  barrier, atomic on the row's group counter), and the last group merger merges the C / T group
  partials; the same argument applies per level. This keeps the serial tail of the launch at a few
  merge steps (C = 82: 3 steps of [8, 8, H] tiles instead of 11).
  Interpret mode runs the programs one after the other, so the last program of each row (group)
  merges; the barriers are skipped there (they have no CPU lowering).
- ``"kernel"`` (the kernels' default): a second small Pallas launch merges the partials (grid (BK, H / HB)).
  Measured (H100, jax 0.11.2, 2026-11-23, ``bench kernels --attention-combines atomic,kernel,xla``, Qwen2.5-7B
  shape, device us per call, kernel / atomic / xla): sparse b1 128K 8.5 / 11.4 / 11.1, b8 128K 22.8 / 24.2 / 25.1,
  b1 512K 17.1 / 19.2 / 17.5; dense b1 128K 98.7 / 100.4 / 100.0. The one-launch atomic merge loses: its serial
  tail (the last program reads the row's partials after every other program has finished) and the counter memset
  cost more than the second launch.
- ``"xla"``: :func:`combine_partials` (several XLA reduce fusions).

With C == 1 the single program normalises and writes the output directly (no partials).
"""

from __future__ import annotations

import math
import os
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# The Pallas Triton backend warns that it is deprecated in favour of Mosaic GPU. Mosaic GPU has
# neither popcount nor vector-index gathers on sm_90 (see shared/GPU.md), so we stay on Triton.
warnings.filterwarnings("ignore", message=".*[Tt]riton.*", category=DeprecationWarning)

Implementation = str  # "xla" | "pallas"
_IMPLEMENTATIONS = ("xla", "pallas")


def default_implementation() -> Implementation:
    """``"pallas"`` when the default backend is a GPU, else ``"xla"``."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def resolve_implementation(implementation: Implementation | None) -> Implementation:
    if implementation is None:
        return default_implementation()
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS} or None, got {implementation!r}")
    return implementation


def default_interpret() -> bool:
    """Interpret flag for tests: ``$SPOTLIGHT_PALLAS_INTERPRET`` if set, else True unless on a GPU."""
    env = os.environ.get("SPOTLIGHT_PALLAS_INTERPRET")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "")
    return jax.default_backend() != "gpu"


def triton_params(num_warps: int | None = None, num_stages: int | None = None):
    """``CompilerParams`` of the Pallas Triton lowering (same name in jax 0.10.2 and 0.11.x)."""
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cdiv_traced(a, b):
    """Ceiling division of traced integers inside a kernel (the form the Triton lowering was tested with)."""
    return (a + b - 1) // b


# ------------------------------------------------------------------------------------------------
# Flash-decoding pieces shared by the dense and the sparse decode-attention kernels.

NEG = -1e30  # finite "minus infinity": keeps exp() and max() NaN-free for empty blocks


def padded_group_queries(q_ref, group: int):
    """The G query heads of a row as the [GP, H] tile of the tensor-core dot (GP = G padded to a power of two, at
    least 16); rows >= G repeat the last head and are never stored."""
    gp = max(16, next_pow2(group))
    return q_ref[jnp.minimum(lax.broadcasted_iota(jnp.int32, (gp,), 0), group - 1), :]


def softmax_init(rows: int, head_dim: int):
    """Empty running state (o [rows, H], m [rows], l [rows]) of an online softmax."""
    return (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), NEG, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


def online_softmax_step(q, kb, vb, ok, carry, scale: float | None = None):
    """One block of an online softmax: q [R, H] against rows kb / vb [BS, H] where ok [BS] -> new (o, m, l).

    fp32 accumulation (IEEE dots for fp32 inputs). ``scale`` multiplies the fp32 logits (None: q is pre-scaled).
    """
    o, m, l_sum = carry
    logits = lax.dot_general(
        q, kb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST
    )  # [R, BS]
    if scale is not None:
        logits = logits * scale
    logits = jnp.where(ok[None, :], logits, NEG)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))  # [R]
    p = jnp.where(ok[None, :], jnp.exp(logits - m_new[:, None]), 0.0)  # [R, BS]
    alpha = jnp.exp(m - m_new)
    l_new = alpha * l_sum + jnp.sum(p, axis=1)
    pv = lax.dot_general(
        p.astype(vb.dtype), vb, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
        precision=lax.Precision.HIGHEST,
    )  # [R, H]  # fmt: skip
    return alpha[:, None] * o + pv, m_new, l_new


def normalize(o, l_sum):
    """o [..., R, H] / l [..., R] -> [..., R, H]; zeros where l == 0 (nothing was live)."""
    return jnp.where(l_sum[..., None] > 0, o / jnp.where(l_sum > 0, l_sum, 1.0)[..., None], 0.0)


def combine_partials(o, m, l_sum):
    """Merge split-k partials: o [BK, C, R, H], m / l [BK, C, R] -> [BK, R, H] fp32 (zeros where nothing was live)."""
    m_all = jnp.max(m, axis=1, keepdims=True)  # [BK, 1, R]
    w = jnp.exp(m - m_all)  # [BK, C, R]
    num = jnp.sum(w[..., None] * o, axis=1)  # [BK, R, H]
    den = jnp.sum(w * l_sum, axis=1)  # [BK, R]
    return normalize(num, den)


COMBINES = ("atomic", "kernel", "xla")
MERGE_TILE = 8192  # f32 elements of o per merge step (64 registers per thread at 4 warps)


def _iota(shape, dim: int):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def merge_tile_parts(num_parts: int, group: int, block_h: int) -> int:
    """CB: parts merged per step of :func:`merge_partials` (o tiles [CB, GQ, HB] of at most ``MERGE_TILE``)."""
    return int(min(next_pow2(num_parts), max(1, prev_pow2(MERGE_TILE // (next_pow2(group) * block_h)))))


def merge_group_size(num_parts: int, group: int, head_dim: int) -> int:
    """T: parts per group of the two-level atomic merge (T == C: one level).

    The last program of each group of T parts merges the group, the last group merger merges the
    C / T group partials: about sqrt(C) parts per level (a multiple of CB), used when it takes fewer
    serial merge steps than one level (C = 82 at CB = 8: 2 + 1 steps instead of 11).
    """
    cb = merge_tile_parts(num_parts, group, head_dim)
    t = cb * cdiv(math.isqrt(num_parts - 1) + 1, cb)
    if t >= num_parts or cdiv(t, cb) + cdiv(cdiv(num_parts, t), cb) >= cdiv(num_parts, cb):
        return num_parts
    return t


def store_head_rows(ref, value, group: int, part=None, col0=0):
    """Stores the first ``group`` rows of ``value`` [R, W] (or [R]) into ``ref`` [G, >= W] (or [G]), or into
    ``ref[part]`` of a [C, G, ...] ref, at columns ``col0 + [0, W)``.

    The padded rows R >= G are masked *and* indexed out of range: a masked scatter with duplicate indices
    would let interpret mode write back a masked row's old value over a real one (Triton skips masked lanes).
    """
    idx = [_iota(value.shape, 0)]
    if value.ndim == 2:
        idx.append(col0 + _iota(value.shape, 1))
    if part is not None:
        idx.insert(0, part)
    plgpu.store(ref.at[tuple(idx)], value.astype(ref.dtype), mask=idx[-value.ndim] < group)


def _store_partial(refs, part, partial, group: int):
    for ref, value in zip(refs, partial, strict=True):
        store_head_rows(ref, value, group, part)


def merge_partials(
    o_ref, m_ref, l_ref, *, group: int, count, max_count: int, first=0, col0=0, block_h: int | None = None
):
    """In-kernel merge of parts [first, first + count) of one row: o_ref [C, G, H], m_ref / l_ref [C, G] f32
    -> unnormalised (o [GQ, HB], m [GQ], l [GQ]) of columns [col0, col0 + HB) (GQ = G padded to a power
    of two; ``count`` <= ``max_count`` may be traced).

    An online max over steps of CB parts: each step loads o [CB, GQ, HB] (padded rows and parts past
    ``count`` are masked loads) and merges it with weights exp(m - running max). The loads are volatile
    (served by L2: the atomic merge reads what other programs have just written).
    """
    num_parts, _, h = o_ref.shape
    hb = h if block_h is None else block_h
    gq = next_pow2(group)
    cb = merge_tile_parts(max_count, group, hb)
    tile, tile3 = (cb, gq), (cb, gq, hb)

    def body(step, carry):
        acc, m_run, den = carry
        local = step * cb + _iota(tile, 0)
        head = _iota(tile, 1)
        ok = (local < count) & (head < group)  # [CB, GQ]
        part, head = jnp.minimum(first + local, num_parts - 1), jnp.minimum(head, group - 1)
        m_t = plgpu.load(m_ref.at[part, head], mask=ok, other=NEG, volatile=True)  # [CB, GQ]
        l_t = plgpu.load(l_ref.at[part, head], mask=ok, other=0.0, volatile=True)
        idx3 = (
            jnp.broadcast_to(part[:, :, None], tile3),
            jnp.broadcast_to(head[:, :, None], tile3),
            col0 + _iota(tile3, 2),
        )
        ok3 = jnp.broadcast_to(ok[:, :, None], tile3)
        o_t = plgpu.load(o_ref.at[idx3], mask=ok3, other=0.0, volatile=True)  # [CB, GQ, HB]
        m_new = jnp.maximum(m_run, jnp.max(m_t, axis=0))  # [GQ]
        alpha = jnp.exp(m_run - m_new)
        w = jnp.exp(m_t - m_new[None, :])  # [CB, GQ] (masked entries: o = l = 0)
        acc = alpha[:, None] * acc + jnp.sum(w[:, :, None] * o_t, axis=0)
        return acc, m_new, alpha * den + jnp.sum(w * l_t, axis=0)

    return lax.fori_loop(0, cdiv(max_count, cb), body, softmax_init(gq, hb))


def sync_count(count_ref, slot, interpret: bool):
    """CTA barrier (all threads' stores before the release), then ``count[slot] += 1`` -> the old count
    (atom.add.acq_rel.gpu, one thread; see the module docstring). ``slot``: an index or a tuple of them."""
    if not interpret:
        plgpu.debug_barrier()
    return plgpu.atomic_add(count_ref, _index(slot), jnp.int32(1))


def _index(slot) -> tuple:
    """An atomic's index as a tuple of int32 scalars (plain ints fail in interpret mode)."""
    return tuple(jnp.asarray(i, jnp.int32) for i in (slot if isinstance(slot, tuple) else (slot,)))


# Polls of ``wait_count`` before it gives up (~1 s at ~1 us per L2 atomic round trip): a broken ordering
# assumption then shows as a wrong result and a nonzero stall count, not as a hung GPU.
MAX_SPINS = 1 << 20


def wait_count(count_ref, slot: tuple, target, stall_slot: tuple, interpret: bool, max_spins: int = MAX_SPINS):
    """Spins until ``count[slot] >= target`` (acq_rel atomic reads of ``count[slot] + 0`` by one thread), then a CTA
    barrier that orders the acquire before every thread's loads (the consumer half of :func:`sync_count`).

    Only safe when the producers cannot be waiting for this program: in the one-launch top-k they are programs of
    lower id, which the GPU dispatches first (the forward-progress assumption of decoupled look-back scans). After
    ``max_spins`` polls it stops waiting and adds 1 to ``count[stall_slot]`` (callers check that it stays 0). Interpret
    mode runs programs in id order, so the producers are done and the first poll succeeds (a poll that does not
    shows as a stall: the tests check the ordering with ``max_spins`` = 1).
    """
    zero = jnp.int32(0)

    def poll(carry):
        _, spins = carry
        return plgpu.atomic_add(count_ref, _index(slot), zero), spins + 1

    seen, _ = lax.while_loop(lambda c: (c[0] < target) & (c[1] < max_spins), poll, poll((zero, zero)))

    @pl.when(seen < target)
    def _():
        plgpu.atomic_add(count_ref, _index(stall_slot), jnp.int32(1))

    if not interpret:
        plgpu.debug_barrier()


def _last_arrival(done, arrivals, interpret: bool, fn):
    """Runs ``fn`` in the program whose atomic saw ``arrivals - 1`` (all others have stored), after a CTA
    barrier that orders the acquire before every thread's loads."""

    @pl.when(done == arrivals - 1)
    def _():
        if not interpret:
            plgpu.debug_barrier()
        fn()


def _split_k_epilogue(partial, out_refs, *, group: int, num_parts: int, merge_group: int, combine: str, interpret):
    """Stores program (r, c)'s partial (o [GP, H], m / l [GP]); with C == 1 the output instead, and with
    ``combine="atomic"`` the last program of the row (or of its group, then the last group) merges."""
    if num_parts == 1:
        (out_ref,) = out_refs
        store_head_rows(out_ref, normalize(partial[0], partial[2]), group)
        return
    part = pl.program_id(1)
    _store_partial(out_refs[:3], part, partial, group)
    if combine != "atomic":
        return
    count_ref, out_ref = out_refs[-2:]

    def finish(refs, count):
        acc, _, den = merge_partials(*refs, group=group, count=count, max_count=count)
        store_head_rows(out_ref, normalize(acc, den), group)

    if merge_group == num_parts:  # one level
        done = sync_count(count_ref, jnp.int32(0), interpret)
        _last_arrival(done, num_parts, interpret, lambda: finish(out_refs[:3], num_parts))
        return
    num_groups = cdiv(num_parts, merge_group)
    grp = part // merge_group
    first = grp * merge_group
    size = jnp.minimum(merge_group, num_parts - first)  # the last group may be short

    def merge_group_parts():
        merged = merge_partials(*out_refs[:3], group=group, count=size, max_count=merge_group, first=first)
        _store_partial(out_refs[3:6], grp, merged, group)
        done = sync_count(count_ref, jnp.int32(num_groups), interpret)
        _last_arrival(done, num_groups, interpret, lambda: finish(out_refs[3:6], num_groups))

    done = sync_count(count_ref, grp, interpret)
    _last_arrival(done, size, interpret, merge_group_parts)


def _row_spec(*shape):
    """Block of one whole row r of a [BK, *shape] array, for every program (r, c)."""
    return pl.BlockSpec((None, *shape), lambda r, *_: (r,) + (0,) * len(shape))


def _partial_buffers(bk: int, num_parts: int, group: int, head_dim: int):
    """Specs and shapes of one level of partials: o [BK, C, G, H], m / l [BK, C, G] f32 (whole-row blocks)."""
    dims = [(num_parts, group, head_dim), (num_parts, group), (num_parts, group)]
    return [_row_spec(*d) for d in dims], [jax.ShapeDtypeStruct((bk, *d), jnp.float32) for d in dims]


# The merge launch's grid is (BK, H / HB). H / 4 columns per program (4 programs per row) unless that leaves fewer than
# MERGE_PROGRAMS programs; then HB halves down to MERGE_MIN_BLOCK_H (8 f32 = one 32-byte sector per (part, head)): a
# program's chain is a few dependent loads of its [CB, GQ, HB] tiles, and a narrower HB also lets a tile hold more
# parts (fewer steps). Measured (H100, jax 0.11.2, 2026-11-23, merge kernel device us, Qwen2.5-7B shape, HB 8 / 32):
# b1 (BK 4) 128K 2.50 / 3.33, 512K 4.05 / 5.47; b8 (BK 32) 128K 2.96 / 2.22, 512K 2.98 / 2.54: finer only at batch 1.
MERGE_PROGRAMS = 128
MERGE_MIN_BLOCK_H = 8


def merge_block_h(bk: int, head_dim: int) -> int:
    """HB: head_dim columns per program of the merge launch (see ``MERGE_PROGRAMS``)."""
    hb = head_dim // 4 if head_dim >= 64 else head_dim
    while hb > MERGE_MIN_BLOCK_H and hb % 2 == 0 and bk * (head_dim // hb) < MERGE_PROGRAMS:
        hb //= 2
    return hb


def merge_partials_call(
    o,
    m,
    l_sum,
    out_dtype,
    *,
    block_h: int | None = None,
    num_warps: int = 4,
    interpret: bool = False,
    name: str = "merge",
):
    """``combine="kernel"``: one Pallas launch merging o [BK, C, G, H], m / l [BK, C, G] -> [BK, G, H].

    Grid (BK, H / HB), ``block_h`` = HB (None: :func:`merge_block_h`)."""
    bk, num_parts, group, h = o.shape
    hb = merge_block_h(bk, h) if block_h is None else block_h
    if h % hb:
        raise ValueError(f"merge block_h={hb} must divide head_dim={h}")

    def kernel(o_ref, m_ref, l_ref, out_ref):
        col0 = pl.multiple_of(pl.program_id(1) * hb, hb)
        acc, _, den = merge_partials(
            o_ref, m_ref, l_ref, group=group, count=num_parts, max_count=num_parts, col0=col0, block_h=hb
        )
        store_head_rows(out_ref, normalize(acc, den), group, col0=col0)

    specs, _ = _partial_buffers(bk, num_parts, group, h)
    return pl.pallas_call(
        kernel,
        grid=(bk, h // hb),
        in_specs=specs,
        out_specs=_row_spec(group, h),
        out_shape=jax.ShapeDtypeStruct((bk, group, h), out_dtype),
        compiler_params=triton_params(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name=name,
    )(o, m, l_sum)


def qkv_row_blocks(q, k_cache, v_cache):
    """Per-row views of a decode step's inputs and their blocks for program (r, c) of a (BK, C) grid.

    q [B, N, H], k / v caches [B, K, S, H] -> ((q [BK, G, H], k [BK, S, H], v [BK, S, H]), [their BlockSpecs]):
    row r = b * K + k sees its G query heads and its whole cache rows (no copy: reshapes of contiguous arrays).
    """
    b, n, h = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    bk, g = b * kv, n // kv
    arrays = (q.reshape(bk, g, h), k_cache.reshape(bk, s, h), v_cache.reshape(bk, s, h))
    return arrays, [_row_spec(g, h), _row_spec(s, h), _row_spec(s, h)]


def split_k_attention(
    body,
    inputs,
    in_specs,
    *,
    grid: tuple[int, int],
    group: int,
    head_dim: int,
    out_dtype,
    combine: str,
    num_warps: int,
    num_stages: int,
    interpret: bool,
    name: str,
    merge_block_h: int | None = None,
):
    """Flash-decoding launch: ``body(*in_refs) -> (o [GP, H], m [GP], l [GP])`` runs as program (r, c) of
    ``grid`` = (BK, C); the C partials of each row are merged as ``combine`` says -> [BK, G, H] ``out_dtype``
    (``merge_block_h``: columns per program of the ``"kernel"`` merge, None = automatic).
    """
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    bk, num_parts = grid
    n_in = len(inputs)
    out_spec = _row_spec(group, head_dim)
    out_struct = jax.ShapeDtypeStruct((bk, group, head_dim), out_dtype)
    merge_group, aliases = num_parts, {}
    if num_parts == 1:
        out_specs, out_shape = [out_spec], [out_struct]
    else:
        out_specs, out_shape = _partial_buffers(bk, num_parts, group, head_dim)
        if combine == "atomic":
            merge_group = merge_group_size(num_parts, group, head_dim)
            num_groups = cdiv(num_parts, merge_group)
            if num_groups > 1:  # group partials o [BK, C / T, G, H], m / l [BK, C / T, G]
                specs, shapes = _partial_buffers(bk, num_groups, group, head_dim)
                out_specs, out_shape = out_specs + specs, out_shape + shapes
            # Arrival counters of a row: one per group (+ one for the groups), from zeros updated in place.
            counters = num_groups + 1 if num_groups > 1 else 1
            inputs, in_specs = (*inputs, jnp.zeros((bk, counters), jnp.int32)), [*in_specs, _row_spec(counters)]
            aliases = {n_in: len(out_specs)}
            out_specs = out_specs + [_row_spec(counters), out_spec]
            out_shape = out_shape + [jax.ShapeDtypeStruct((bk, counters), jnp.int32), out_struct]

    def kernel(*refs):
        partial = body(*refs[:n_in])
        out_refs = refs[len(inputs) :]
        _split_k_epilogue(
            partial,
            out_refs,
            group=group,
            num_parts=num_parts,
            merge_group=merge_group,
            combine=combine,
            interpret=interpret,
        )

    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=triton_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(*inputs)
    if num_parts == 1 or combine == "atomic":
        return outs[-1]
    if combine == "xla":
        return combine_partials(*outs).astype(out_dtype)
    return merge_partials_call(
        *outs, out_dtype, block_h=merge_block_h, num_warps=num_warps, interpret=interpret, name=f"{name}_merge"
    )


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def prev_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n.bit_length() - 1)
