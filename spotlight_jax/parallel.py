"""Tensor parallelism over attention heads for the decode step (one host, several GPUs).

Why: every decode step reads all the weights; with the heads split over `tp` GPUs each reads 1 / tp of them, and the
batch at which dense attention still fits grows ~tp-fold, so the KV bytes that Spotlight skips dominate the step
(arithmetic in experiments/log/tensor_parallel.md).

How: a 1-D mesh with axis "tp". The dense parts run under XLA's SPMD partitioner from the placement of the parameters
(`shard_model`): q/k/v projections and the MLP's gate/up split by output columns (whole heads: query head j lives
with KV head j // G), o_proj and down_proj by input rows (XLA inserts the all-reduces). The attention decode step
(cache-row writes, key codes, retrieval and attention, all Pallas kernels on the GPU) runs per device in
`jax.shard_map` over the KV-head axis (`spotlight_jax.sharding.sharded_decode`, which the model calls): the kernels
work per (batch row, KV head), so each device runs them unchanged on its K / tp heads. Caches and code caches are
split on the KV-head axis (`shard_cache`); hash modules (leading KV-head axis on every parameter) likewise.

Use: `mesh = tp_mesh(2)`; `model = shard_model(model, mesh)`; `cache = shard_cache(cache, mesh)`; pass
`RetrievalConfig(..., mesh=mesh)` to the decode loop. Prefill is left to the SPMD partitioner.

Axis legend: B batch, N query heads, K KV heads, T new tokens (1 when decoding), S cache length, H head_dim.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from spotlight_jax.model import CausalLM, KVCache
from spotlight_jax.sharding import AXIS, HEADS

# Parameter path suffix -> PartitionSpec (nnx paths like ('layers', 3, 'attn', 'q_proj', 'kernel')).
_RULES = {
    ("attn", "q_proj", "kernel"): P(None, AXIS),
    ("attn", "k_proj", "kernel"): P(None, AXIS),
    ("attn", "v_proj", "kernel"): P(None, AXIS),
    ("attn", "q_proj", "bias"): P(AXIS),
    ("attn", "k_proj", "bias"): P(AXIS),
    ("attn", "v_proj", "bias"): P(AXIS),
    ("attn", "o_proj", "kernel"): P(AXIS, None),
    ("mlp", "gate_proj", "kernel"): P(None, AXIS),
    ("mlp", "up_proj", "kernel"): P(None, AXIS),
    ("mlp", "down_proj", "kernel"): P(AXIS, None),
    ("lm_head", "kernel"): P(None, AXIS),  # logits split by vocabulary (1 GB of Qwen2.5-7B weights)
}


def tp_mesh(tp: int, devices=None) -> Mesh:
    """1-D mesh of the first `tp` devices, axis "tp"."""
    devices = list(devices if devices is not None else jax.devices())
    if tp < 1 or tp > len(devices):
        raise ValueError(f"tensor parallelism over {tp} devices asked, {len(devices)} available ({devices[:4]}...)")
    return Mesh(np.array(devices[:tp]), (AXIS,))


def check_divisible(cfg, tp: int) -> None:
    """Heads and MLP width must split evenly over the devices."""
    bad = {
        name: v
        for name, v in (("num_kv_heads", cfg.num_kv_heads), ("intermediate_size", cfg.intermediate_size))
        if v % tp
    }
    if bad:
        raise ValueError(f"{bad} not divisible by tp={tp}: pick a tp that divides the KV heads and the MLP width")


def param_spec(path: tuple, shape: tuple[int, ...] | None = None, tp: int = 1) -> P:
    """PartitionSpec of one model parameter from its nnx path (replicated unless a rule matches).

    The vocabulary split of lm_head is an optimisation, not a requirement: a vocabulary that `tp` does not divide
    keeps lm_head replicated (heads and MLP width must divide: `check_divisible`)."""
    names = tuple(str(p) for p in path if not isinstance(p, int))
    for suffix, spec in _RULES.items():
        if names[-len(suffix) :] == suffix:
            if suffix[0] == "lm_head" and shape is not None and shape[-1] % tp:
                return P()
            return spec
    return P()


def shard_model(model: CausalLM, mesh: Mesh) -> CausalLM:
    """The model with its parameters placed on `mesh` (heads / MLP columns split, the rest replicated)."""
    check_divisible(model.cfg, mesh.shape[AXIS])
    graphdef, state = nnx.split(model)
    flat = {
        path: jax.device_put(leaf, NamedSharding(mesh, param_spec(path, np.shape(leaf), mesh.shape[AXIS])))
        for path, leaf in nnx.to_flat_state(state)  # fmt: skip
    }
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def shard_hashes(hashes, mesh: Mesh):
    """A HashStack (every parameter has a leading KV-head or query-head axis) split on that axis."""
    graphdef, state = nnx.split(hashes)
    state = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P(AXIS))), state)
    return nnx.merge(graphdef, state)


def cache_sharding(mesh: Mesh) -> NamedSharding:
    """Where a [B, K, S, X] cache buffer lives: split on the KV-head axis."""
    return NamedSharding(mesh, HEADS)


def shard_cache(cache: KVCache, mesh: Mesh) -> KVCache:
    """KV and code caches [B, K, S, X] split on the KV-head axis."""
    put = lambda x: None if x is None else jax.device_put(x, cache_sharding(mesh))
    return KVCache(tuple(map(put, cache.k)), tuple(map(put, cache.v)), tuple(map(put, cache.codes)))
