"""Exact q.k scores of selected candidate rows, gathered inside the kernel: the rescoring stage of a two-stage top-k.

Axis legend: B batch, N query heads, K KV heads, G = N / K, GP = G padded to a power of two (>= 16 for the
tensor-core dot), S cache length, H head_dim, C candidates per (batch row, KV head), BC candidates per program,
BK = B * K rows.

Two-stage selection (``RetrievalConfig.rerank``): the Hamming top-k keeps R * k candidates by their cheap code
scores, this kernel computes the exact scores of only those rows, and the final k are the candidates with the
largest group-summed attention (``spotlight_jax.retrieval.rerank``). One program handles one (row, KV head) and BC
candidates: it gathers their K rows straight from the cache (``k_ref[idx_vec, :]``, no materialised copy), so each
candidate row is read once for all G query heads of its group. V is not read here: the sparse attention reads the
V rows (and K rows) of the final k only.

Bytes: C * H * itemsize of gathered K per (row, KV head) + C indices and validity + G * C * 4 of fp32 logits out.
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
    NEG,
    cdiv,
    default_interpret,
    next_pow2,
    padded_group_queries,
    resolve_implementation,
    triton_params,
)

BLOCK_C = 64  # candidates per program: a [GP, 64] fp32 tile and 64 gathered rows (16 KB of bf16 K at H = 128)


def _candidate_scores_kernel(q_ref, k_ref, idx_ref, ok_ref, o_ref, *, group: int, num_slots: int, block_c: int,
                             scale: float):  # fmt: skip
    """Program (row, block): logits [GP, BC] fp32 of the row's G query heads against BC gathered rows (NEG where
    a slot is invalid or past the row's C slots)."""
    q = padded_group_queries(q_ref, group)  # [GP, H]
    slots = pl.program_id(1) * block_c + lax.broadcasted_iota(jnp.int32, (block_c,), 0)  # [BC]
    in_row = slots < num_slots
    safe = jnp.where(in_row, slots, 0)
    idx = plgpu.load(idx_ref.at[safe], mask=in_row, other=0)  # [BC]
    ok = in_row & (plgpu.load(ok_ref.at[safe], mask=in_row, other=0) != 0)
    kb = k_ref[jnp.where(ok, idx, 0), :]  # [BC, H] gathered rows
    logits = lax.dot_general(
        q, kb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST
    )  # [GP, BC]
    o_ref[...] = jnp.where(ok[None, :], logits * scale, NEG)


@functools.partial(jax.jit, static_argnames=("scale", "block_c", "num_warps", "num_stages", "interpret"))
def candidate_scores_pallas(
    q,  # [B, N, H]
    k_cache,  # [B, K, S, H]
    indices,  # [B, K, C] int32 in [0, S)
    valid,  # [B, K, C] bool
    *,
    scale: float,
    block_c: int = BLOCK_C,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """The Pallas kernel (module docstring) -> [B, K, G, C] fp32 scaled logits, -inf at invalid slots."""
    b, n, h = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    c = indices.shape[2]
    g, bk = n // kv, b * kv
    gp = max(16, next_pow2(g))
    block_c = min(block_c, max(16, next_pow2(c)))
    nc = cdiv(c, block_c)
    kernel = functools.partial(_candidate_scores_kernel, group=g, num_slots=c, block_c=block_c, scale=scale)
    out = pl.pallas_call(
        kernel,
        grid=(bk, nc),
        in_specs=[
            pl.BlockSpec((None, g, h), lambda r, i: (r, 0, 0)),
            pl.BlockSpec((None, s, h), lambda r, i: (r, 0, 0)),
            pl.BlockSpec((None, c), lambda r, i: (r, 0)),
            pl.BlockSpec((None, c), lambda r, i: (r, 0)),
        ],
        out_specs=pl.BlockSpec((None, gp, block_c), lambda r, i: (r, 0, i)),
        out_shape=jax.ShapeDtypeStruct((bk, gp, nc * block_c), jnp.float32),
        compiler_params=triton_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="candidate_scores",
    )(
        q.astype(k_cache.dtype).reshape(bk, g, h),
        k_cache.reshape(bk, s, h),
        indices.reshape(bk, c).astype(jnp.int32),
        valid.reshape(bk, c).astype(jnp.int8),
    )  # [BK, GP, NC * BC]
    out = out[:, :g, :c].reshape(b, kv, g, c)
    return jnp.where(valid[:, :, None, :], out, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("scale",))
def candidate_scores_reference(q, k_cache, indices, valid, *, scale: float):
    """XLA gather + fp32 einsum: [B, K, G, C] scaled logits, -inf at invalid slots."""
    b, n, h = q.shape
    kv = k_cache.shape[1]
    ks = jnp.take_along_axis(k_cache, indices[..., None], axis=2).astype(jnp.float32)  # [B, K, C, H]
    qg = q.reshape(b, kv, n // kv, h).astype(k_cache.dtype).astype(jnp.float32)
    logits = jnp.einsum("bkgh,bkch->bkgc", qg, ks, precision=lax.Precision.HIGHEST) * scale
    return jnp.where(valid[:, :, None, :], logits, -jnp.inf)


def candidate_scores(
    q,  # [B, N, H]
    k_cache,  # [B, K, S, H]
    indices,  # [B, K, C] int32 in [0, S)
    valid,  # [B, K, C] bool
    scale: float | None = None,
    *,
    implementation: str | None = None,
    interpret: bool | None = None,
    block_c: int = BLOCK_C,
):
    """Scaled q.k logits [B, K, G, C] fp32 of each KV head's G query heads against its C candidate rows (-inf where
    not valid). ``implementation``: "pallas" | "xla" | None (Pallas on GPU)."""
    if q.ndim != 3 or k_cache.ndim != 4 or indices.ndim != 3:
        raise ValueError(
            f"candidate_scores takes q [B, N, H], k_cache [B, K, S, H], indices [B, K, C]; got {q.shape}, "
            f"{k_cache.shape}, {indices.shape}"
        )
    b, n, h = q.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != h or n % k_cache.shape[1] or indices.shape[:2] != k_cache.shape[:2]:
        raise ValueError(f"shapes disagree: q {q.shape}, k_cache {k_cache.shape}, indices {indices.shape}")
    valid = jnp.broadcast_to(valid, indices.shape)
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
    if resolve_implementation(implementation) == "xla":
        return candidate_scores_reference(q, k_cache, indices, valid, scale=scale)
    interpret = default_interpret() if interpret is None else bool(interpret)
    return candidate_scores_pallas(q, k_cache, indices, valid, scale=scale, block_c=block_c, interpret=interpret)
