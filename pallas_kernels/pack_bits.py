"""Sign bits of the last axis packed little-endian into uint32 words.

``pack_bits(x)[..., w]`` has bit ``i`` set iff ``x[..., 32 * w + i] > 0``. Not on the hot path of
decoding (one query code per step, one key code per new token), so the kernel is simple: one
program packs ``block_rows`` words, each a [32]-lane reduction of shifted sign bits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import resolve_implementation, triton_params


def _pack_bits_kernel(
    x_ref,  # [block_rows, 32] any real dtype
    o_ref,  # [block_rows] int32 (bit pattern of the uint32 word)
):
    bits = (x_ref[...] > 0).astype(jnp.int32)
    shifts = jax.lax.broadcasted_iota(jnp.int32, bits.shape, 1)
    # The 32 shifted bits are disjoint, so an int32 sum (wrapping at bit 31) is their OR.
    o_ref[...] = jnp.sum(bits << shifts, axis=1)


@functools.partial(jax.jit, static_argnames=("block_rows", "interpret"))
def _pack_bits_pallas(x, *, block_rows: int = 256, interpret: bool = False):
    *lead, bits = x.shape
    rows = x.size // 32
    x2 = x.reshape(rows, 32)
    # Block rows must be a power of two that divides the row count (no masked tail needed).
    block_rows = min(block_rows, rows & -rows)
    out = pl.pallas_call(
        _pack_bits_kernel,
        grid=(rows // block_rows,),
        in_specs=[pl.BlockSpec((block_rows, 32), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((block_rows,), lambda i: (i,)),
        out_shape=jax.ShapeDtypeStruct((rows,), jnp.int32),
        compiler_params=triton_params(num_warps=4, num_stages=1),
        interpret=interpret,
        name="pack_bits",
    )(x2)
    return jax.lax.bitcast_convert_type(out, jnp.uint32).reshape(*lead, bits // 32)


@jax.jit
def pack_bits_reference(x):
    """Pure-jnp reference: ``x [..., bits] -> uint32 [..., bits // 32]``."""
    *lead, bits = x.shape
    b = (x > 0).astype(jnp.uint32).reshape(*lead, bits // 32, 32)
    return jnp.sum(b << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def pack_bits(
    x,  # [..., bits], bits a multiple of 32
    *,
    implementation: str | None = None,
    interpret: bool = False,
):
    """Packs the signs (``> 0``) of the last axis into ``uint32 [..., bits // 32]``, little-endian."""
    if x.shape[-1] % 32:
        raise ValueError(f"last axis must be a multiple of 32, got {x.shape}")
    if resolve_implementation(implementation) == "xla":
        return pack_bits_reference(x)
    return _pack_bits_pallas(x, interpret=interpret)
