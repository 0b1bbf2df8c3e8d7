"""The trained hash module's forward pass: a stack of per-KV-head layers (`HashMLP`) and its `jnp` reference.

`spotlight_jax.hashing` builds a `HashMLP` from its parameters and runs `hash_mlp_reference` as its forward pass; the
fused decode prologue (`pallas_kernels.decode_prologue`) runs the same layers inside its kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weights", "biases"],
                   meta_fields=["silu_first", "residual"])  # fmt: skip
@dataclasses.dataclass(frozen=True)
class HashMLP:
    """A stack of per-KV-head hash layers: weights [K, Din, Dout], biases [K, Dout] (or None) per layer; the flags
    are static (SiLU after the first layer; residual ``x + f(x)`` where the widths match)."""

    weights: tuple[jax.Array, ...]
    biases: tuple[jax.Array | None, ...]
    silu_first: bool = True
    residual: bool = True

    def dims(self) -> tuple[int, ...]:
        return (self.weights[0].shape[1], *(w.shape[2] for w in self.weights))


def hash_mlp_reference(x: jax.Array, mlp: HashMLP) -> jax.Array:
    """x [K, M, Din] (any float dtype) -> fp32 features [K, M, bits]; head k uses layer weights [k]."""
    y = x.astype(jnp.float32)
    for i, (w, b) in enumerate(zip(mlp.weights, mlp.biases, strict=True)):
        z = jnp.einsum("kmi,kio->kmo", y, w)
        if b is not None:
            z = z + b[:, None, :]
        if i == 0 and mlp.silu_first:
            z = jax.nn.silu(z)
        y = y + z if (mlp.residual and z.shape[-1] == y.shape[-1]) else z
    return y
