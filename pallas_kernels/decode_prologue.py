"""The decode step's prologue of one layer in one kernel: RoPE, hash codes, and the K / V / code cache writes.

Axis legend: B batch, N query heads, K KV heads, G = N / K, GP >= G + 1 padded rows of the dot tile (a power of
two, at least 16), S cache length, H head_dim, W = bits / 32 code words, L hash-MLP layers.

What it replaces: between the q / k / v projections and the retrieval of a sparse layer, XLA runs ~15 small
kernels per layer and step (RoPE's concatenates, two transposes, the two hash MLPs' dots, two ``pack_bits``, the
K, V and code-cache scatters; 1-2 us each, ~27 us per layer on an H200 under TP=2: ``gen_tp2_triton.log``). Here
one program per (batch row, KV head):

1. loads the G query heads of the group and the key as one [GP, H] tile (row G is the key), and their
   rotate-half partners (a permuted load), and applies RoPE in fp32 (``cos`` / ``sin`` [B, H] are the HF tables of
   each row's position); the result is rounded to the activation dtype, as the unfused path does;
2. runs the hash MLP of its KV head on the tile (fp32 values; TF32 dots when compiled, as XLA's fp32 dots on the
   GPU): layer l is ``x @ W_l[h] + b_l[h]``, SiLU after the first layer if ``silu_first``, ``x + f(x)`` where the
   widths match if ``residual`` (SpotlightHash's MLP; LinearHash is one layer without bias, SiLU or residual);
3. packs the signs into W words per row (bit i of word w = feature 32 w + i > 0);
4. stores the rotated queries and their codes, and writes the rotated key, the value and the key's code at row
   ``pos[b]`` of the caches, which are aliased in place (``input_output_aliases``).

Without hash weights (dense / oracle / quest layers) it does 1 and the K / V writes only. The reference
(:func:`decode_prologue_reference`) is the unfused computation in ``jnp``; its pieces (:func:`rope_reference`,
:func:`write_rows`, and ``pallas_kernels.hash_mlp``'s :func:`hash_mlp_reference`) are what the model and the hash
modules use themselves.

Bytes: q, k, v rows, the hash weights (L2-resident after the first program of a head), q out + codes; the writes
are one H-row per cache and one W-word row per code cache: no cache byte is read.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    _iota,
    default_interpret,
    next_pow2,
    resolve_implementation,
    store_head_rows,
    triton_params,
)
from pallas_kernels.hash_mlp import HashMLP, hash_mlp_reference
from pallas_kernels.pack_bits import pack_bits_reference


class Prologue(NamedTuple):
    q: jax.Array  # [B, N, H] rotated queries (q's dtype)
    q_codes: jax.Array | None  # [B, N, W] uint32 (None without a hash)
    k_cache: jax.Array  # [B, K, S, H]
    v_cache: jax.Array  # [B, K, S, H]
    code_cache: jax.Array | None  # [B, K, S, W] uint32


# ----------------------------------------------------------------------------------------------------------------
# References (also the pieces the model and the hash modules use).


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """HF rotate-half tables: positions [...] int, inv_freq [H/2] -> cos, sin [..., H] fp32 (halves repeated)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    return jnp.concatenate([jnp.cos(angles)] * 2, axis=-1), jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)


def rope_reference(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE in fp32, rounded back to x's dtype: x [..., H], cos / sin broadcastable to it."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def write_rows(cache: jax.Array, new: jax.Array, pos: jax.Array) -> jax.Array:
    """cache [B, K, S, X], new [B, K, X], pos [B] -> cache with row b's entry written at pos[b].

    One scatter of unique, in-bounds rows: XLA updates a loop-carried cache in place. (One `dynamic_update_slice` per
    row did too, but B x layers x 3 of them made the compile time grow with the batch: 86 s for the 28-layer
    Qwen-shape spotlight step at B = 20 vs 8 s at B = 1, H100.)
    """
    rows = jnp.arange(cache.shape[0])
    return cache.at[rows, :, pos].set(new.astype(cache.dtype), unique_indices=True, mode="promise_in_bounds")


@jax.jit
def decode_prologue_reference(q, k, v, cos, sin, pos, k_cache, v_cache, code_cache=None, mlp=None) -> Prologue:
    """The unfused prologue in ``jnp`` (arguments as :func:`decode_prologue`)."""
    q_rot = rope_reference(q, cos[:, None], sin[:, None])  # [B, N, H]
    k_rot = rope_reference(k, cos[:, None], sin[:, None])  # [B, K, H]
    k_cache, v_cache = write_rows(k_cache, k_rot, pos), write_rows(v_cache, v, pos)
    if mlp is None:
        return Prologue(q_rot, None, k_cache, v_cache, code_cache)
    b, n, h = q.shape
    kv = k.shape[1]
    g = n // kv
    rows = jnp.concatenate([q_rot.reshape(b, kv, g, h), k_rot[:, :, None]], axis=2)  # [B, K, G + 1, H]
    feats = hash_mlp_reference(jnp.moveaxis(rows, 1, 0).reshape(kv, b * (g + 1), h), mlp)  # [K, B (G + 1), bits]
    codes = pack_bits_reference(jnp.moveaxis(feats.reshape(kv, b, g + 1, -1), 0, 1))  # [B, K, G + 1, W]
    q_codes = codes[:, :, :g].reshape(b, n, -1)
    return Prologue(q_rot, q_codes, k_cache, v_cache, write_rows(code_cache, codes[:, :, g], pos))


# ----------------------------------------------------------------------------------------------------------------
# Kernel.


def _prologue_kernel(
    *refs, group: int, rows: int, has_bias: tuple[bool, ...], flags: tuple[bool, bool] | None, interpret: bool
):
    """Program (b, h). refs: q [G, H], k [H], v [H], cos / sin [H], pos [1], the hash layers' weights [Din, Dout]
    (and biases [Dout]), this row's k / v caches [S, H] (and code cache [S, W] uint32) as aliased inputs; then the
    outputs q_out [G, H] (and q_codes [G, W]) and the aliased caches."""
    q_ref, k_ref, v_ref, cos_ref, sin_ref, pos_ref, *rest = refs
    layer_refs = []
    for bias in has_bias:
        w_ref, rest = rest[0], rest[1:]
        b_ref, rest = (rest[0], rest[1:]) if bias else (None, rest)
        layer_refs.append((w_ref, b_ref))
    hashed = flags is not None
    n_caches = 3 if hashed else 2
    rest = rest[n_caches:]  # the aliased cache inputs: written through the outputs below
    q_out = rest[0]
    qc_out = rest[1] if hashed else None
    ck_out, cv_out = rest[-n_caches], rest[-n_caches + 1]
    code_out = rest[-1] if hashed else None

    # The hash weights are loaded first: their latency overlaps the RoPE and the cache writes (a store to global
    # memory keeps the loads after it behind it).
    layers = [(w_ref[...], None if b_ref is None else b_ref[...]) for w_ref, b_ref in layer_refs]

    hd = q_ref.shape[-1]
    half = hd // 2
    col = _iota((hd,), 0)
    partner = jnp.where(col < half, col + half, col - half)  # rotate-half: x_rot[j] = -x[j + H/2] | x[j - H/2]
    cos = cos_ref[...]
    sin = jnp.where(col < half, -1.0, 1.0) * sin_ref[...]  # [H] fp32, the rotate-half sign folded in
    dtype = q_ref.dtype

    def rope(x, x_partner):
        return (x.astype(jnp.float32) * cos + x_partner.astype(jnp.float32) * sin).astype(dtype)

    # Key and value of this step: written at row pos[b] of the caches.
    pos = pos_ref[0]
    k_rot = rope(k_ref[...], k_ref[partner])  # [H]
    ck_out[pos, :] = k_rot.astype(ck_out.dtype)
    cv_out[pos, :] = v_ref[...].astype(cv_out.dtype)

    # The group's queries as a [GP, H] tile (padded rows repeat the last head; never stored).
    row = jnp.minimum(_iota((rows,), 0), group - 1)
    q_tile = q_ref[row, :]  # [GP, H]
    q_partner = q_ref[row[:, None], jnp.broadcast_to(partner[None, :], (rows, hd))]
    q_rot = rope(q_tile, q_partner)  # [GP, H]
    store_head_rows(q_out, q_rot, group)
    if not hashed:
        return
    silu_first, residual = flags
    # TF32 dots on the tensor cores when compiled: the precision XLA's own fp32 dots have on the GPU by default, so
    # the unfused path's codes are no more exact (a sign flips only for a feature within ~1e-3 of 0). 3 x TF32 tripled
    # the HMMAs (H100: 9.8 us per call with them and the weights loaded late, 7.5 with neither); IEEE FMA dots spill.
    # Plain fp32 in interpret mode (no TF32 on the CPU).
    precision = lax.Precision.HIGHEST if interpret else lax.DotAlgorithmPreset.TF32_TF32_F32

    # Hash MLP on the queries (rows < G) and the key (row G and the padding rows).
    is_query = _iota((rows, hd), 0) < group
    x = jnp.where(is_query, q_rot, jnp.broadcast_to(k_rot[None, :], (rows, hd))).astype(jnp.float32)
    for i, (w, bias) in enumerate(layers):
        z = lax.dot_general(
            x, w.astype(jnp.float32), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        )
        if bias is not None:
            z = z + bias.astype(jnp.float32)[None, :]
        if i == 0 and silu_first:
            z = z / (1.0 + jnp.exp(-z))
        x = x + z if (residual and z.shape[-1] == x.shape[-1]) else z

    # Sign bits -> W uint32 words per row: the bits shifted to their place, summed over each word's 32 columns in
    # one reduction (the shifted bits are disjoint, so their sum is their OR).
    bits = x.shape[-1]
    words = bits // 32
    shifted = (x > 0).astype(jnp.uint32) << (_iota((rows, bits), 1) % 32).astype(jnp.uint32)  # [GP, bits]
    packed = jnp.sum(shifted.reshape(rows, words, 32), axis=2)  # [GP, W]
    # Query rows < G into q_codes [G, W]; the key's row G at row pos of the code cache [S, W] (masked lanes are
    # indexed out of range too: see `store_head_rows`).
    store_head_rows(qc_out, packed, group)
    row, col = _iota((rows, words), 0), _iota((rows, words), 1)
    key_row = jnp.where(row == group, pos, code_out.shape[0])
    plgpu.store(code_out.at[key_row, col], packed, mask=row == group)


@functools.partial(jax.jit, static_argnames=("num_warps", "interpret"))
def _decode_prologue_pallas(q, k, v, cos, sin, pos, k_cache, v_cache, code_cache, mlp, *, num_warps, interpret):
    b, n, h = q.shape
    kv = k.shape[1]
    g = n // kv
    rows = max(16, next_pow2(g + 1))
    row_block = lambda *shape: pl.BlockSpec((None, None, *shape), lambda i, j: (i, j) + (0,) * len(shape))
    # The (b, h) rows of a cache [B, K, S, X] (block offsets, not whole-array int32 offsets, above 2^31 elements).
    cache_row = lambda x: pl.BlockSpec((None, None, *x.shape[2:]), lambda i, j: (i, j, 0, 0))
    inputs = [q.reshape(b, kv, g, h), k, v, cos, sin, pos]
    specs = [
        row_block(g, h),
        row_block(h),
        row_block(h),
        pl.BlockSpec((None, h), lambda i, j: (i, 0)),
        pl.BlockSpec((None, h), lambda i, j: (i, 0)),
        pl.BlockSpec((1,), lambda i, j: (i,)),
    ]
    has_bias = ()
    if mlp is not None:
        for w, bias in zip(mlp.weights, mlp.biases, strict=True):
            inputs.append(w)
            specs.append(pl.BlockSpec((None, *w.shape[1:]), lambda i, j: (j, 0, 0)))
            if bias is not None:
                inputs.append(bias)
                specs.append(pl.BlockSpec((None, bias.shape[-1]), lambda i, j: (j, 0)))
            has_bias += (bias is not None,)
    caches = [k_cache, v_cache] + ([] if mlp is None else [code_cache])
    first_cache = len(inputs)
    inputs += caches
    specs += [cache_row(c) for c in caches]
    out_shape = [jax.ShapeDtypeStruct((b, kv, g, h), q.dtype)]
    out_specs = [row_block(g, h)]
    if mlp is not None:
        words = mlp.dims()[-1] // 32
        out_shape.append(jax.ShapeDtypeStruct((b, kv, g, words), jnp.uint32))
        out_specs.append(row_block(g, words))
    n_small = len(out_shape)
    out_shape += [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches]
    out_specs += [cache_row(c) for c in caches]
    kernel = functools.partial(
        _prologue_kernel, group=g, rows=rows, has_bias=has_bias,
        flags=None if mlp is None else (mlp.silu_first, mlp.residual), interpret=interpret,
    )  # fmt: skip
    outs = pl.pallas_call(
        kernel,
        grid=(b, kv),
        in_specs=specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases={first_cache + i: n_small + i for i in range(len(caches))},
        compiler_params=triton_params(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="decode_prologue",
    )(*inputs)
    q_rot = outs[0].reshape(b, n, h)
    if mlp is None:
        return Prologue(q_rot, None, outs[1], outs[2], code_cache)
    return Prologue(q_rot, outs[1].reshape(b, n, -1), outs[2], outs[3], outs[4])


def decode_prologue(
    q,  # [B, N, H] queries before RoPE (activation dtype)
    k,  # [B, K, H] this step's keys before RoPE
    v,  # [B, K, H] this step's values
    cos,  # [B, H] fp32 RoPE table of each row's position (``rope_tables``)
    sin,  # [B, H] fp32
    pos,  # [B] int32: the cache row each batch row writes (< S)
    k_cache,  # [B, K, S, H] (updated in place)
    v_cache,  # [B, K, S, H]
    code_cache=None,  # [B, K, S, W] uint32 key codes, or None (no hashing)
    mlp: HashMLP | None = None,  # the layer's hash MLP (needed with a code cache)
    *,
    implementation: str | None = None,
    num_warps: int = 8,  # H100: 7.0-7.4 us per call at 8 warps, 8.7-9.5 at 4 (Qwen2.5-7B shapes, B1-B27)
    interpret: bool | None = None,  # None: $SPOTLIGHT_PALLAS_INTERPRET, else True off the GPU
) -> Prologue:
    """RoPE of q and k, hash codes of both (with ``mlp``), and the K / V / code writes at ``pos``, in one kernel."""
    b, n, h = q.shape
    if k.ndim != 3 or k.shape[0] != b or k.shape[2] != h or v.shape != k.shape or n % k.shape[1]:
        raise ValueError(f"decode_prologue: q [B, N, H] and k / v [B, K, H] with K dividing N, got {q.shape}, "
                         f"{k.shape}, {v.shape}")  # fmt: skip
    kv = k.shape[1]
    if k_cache.shape[:2] != (b, kv) or k_cache.shape[3] != h or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_prologue: caches must be [B={b}, K={kv}, S, H={h}], got {k_cache.shape}, "
                         f"{v_cache.shape}")  # fmt: skip
    if cos.shape != (b, h) or sin.shape != (b, h) or pos.shape != (b,):
        raise ValueError(f"decode_prologue: cos / sin must be [B, H] = {(b, h)} and pos [B], got {cos.shape}, "
                         f"{sin.shape}, {pos.shape}")  # fmt: skip
    if (code_cache is None) != (mlp is None):
        raise ValueError("decode_prologue: a code cache and a hash MLP go together (both or neither)")
    if mlp is not None:
        dims = mlp.dims()
        if dims[0] != h or any(w.shape[0] != kv for w in mlp.weights) or code_cache.shape != (
            *k_cache.shape[:3], dims[-1] // 32
        ):  # fmt: skip
            raise ValueError(f"decode_prologue: hash layers {[w.shape for w in mlp.weights]} do not map head_dim {h} "
                             f"of {kv} KV heads to the code cache's {code_cache.shape[-1]} words")  # fmt: skip
    pos = jnp.asarray(pos, jnp.int32)
    if resolve_implementation(implementation) == "xla":
        return decode_prologue_reference(q, k, v, cos, sin, pos, k_cache, v_cache, code_cache, mlp)
    if not supports_pallas(h, mlp):
        raise ValueError(f"decode_prologue: the Pallas kernel needs head_dim and every hash width a power of two "
                         f">= 32 (got head_dim {h}, hash dims {None if mlp is None else dims})")  # fmt: skip
    return _decode_prologue_pallas(
        q, k, v, cos.astype(jnp.float32), sin.astype(jnp.float32), pos, k_cache, v_cache, code_cache, mlp,
        num_warps=num_warps, interpret=default_interpret() if interpret is None else interpret,
    )  # fmt: skip


def supports_pallas(head_dim: int, mlp: HashMLP | None) -> bool:
    """Whether the kernel's tiles fit: head_dim and the hash widths powers of two >= 32 (Triton tiles)."""
    dims = (head_dim,) + (() if mlp is None else mlp.dims()[1:])
    return all(d >= 32 and d == next_pow2(d) for d in dims)
