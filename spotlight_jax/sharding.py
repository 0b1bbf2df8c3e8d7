"""The decode step of one attention layer on a tensor-parallel mesh: each device runs it on its KV heads.

`spotlight_jax.model` calls `sharded_decode` when `RetrievalConfig.mesh` is set; `spotlight_jax.parallel` (which
places a model's parameters, hash modules and caches on the mesh) builds on the axis and specs here. This module
imports nothing of the model, so the model can import it.

Axis legend: B batch, N query heads, K KV heads, T new tokens (1 when decoding), S cache length, H head_dim.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import jax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

AXIS = "tp"
HEADS = P(None, AXIS)  # [B, heads, ...] activations and caches


def _local_hash_module(graphdef, state, tp: int):
    """The hash module of one device's heads: same code, head counts divided by `tp` (they are shape checks)."""
    module = copy.copy(nnx.merge(graphdef, state))
    module.num_kv_heads //= tp
    module.num_heads //= tp
    return module


def sharded_decode(step: Callable, mesh: Mesh, q, k, v, cache_kv, pos, lengths, hash_module, rope=None):
    """Runs `step(q, k, v, cache_kv, pos, lengths, hash_module, rope) -> (out, new_cache_kv)` on each device's heads.

    q [B, N, T, H], k / v [B, K, T, H], cache_kv (k, v, codes or None) [B, K, S, X], pos / lengths [B] and the RoPE
    tables `rope` ((cos, sin) [B, H] or None) replicated; returns out [B, N, T, H] and the new caches, split on the
    head axis.
    """
    tp = mesh.shape[AXIS]
    hash_graphdef, hash_state = nnx.split(hash_module) if hash_module is not None else (None, None)
    cache_specs = tuple(None if c is None else HEADS for c in cache_kv)
    hash_specs = None if hash_state is None else jax.tree.map(lambda _: P(AXIS), hash_state)

    def local(q, k, v, cache_kv, pos, lengths, hash_state, rope):
        module = None if hash_state is None else _local_hash_module(hash_graphdef, hash_state, tp)
        return step(q, k, v, cache_kv, pos, lengths, module, rope)

    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(HEADS, HEADS, HEADS, cache_specs, P(), P(), hash_specs, P()),
        out_specs=(HEADS, cache_specs),
        check_vma=False,  # Pallas calls inside carry no varying-axis annotations
    )
    return fn(q, k, v, cache_kv, pos, lengths, hash_state, rope)
