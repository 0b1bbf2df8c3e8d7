"""Hash modules that turn post-RoPE queries/keys into packed binary codes, plus export/load.

Two hash families share one interface (`features`, `codes`, `key_codes`, `query_codes`, `soft_*`):

- `SpotlightHash`: the learned MLP of Spotlight Attention, one per (layer, KV head), applied to keys and to the
  group's queries (query head j uses KV head j // G's MLP). Parameters of one layer's K heads are stacked
  (`[K, ...]`) and applied with one einsum.
- `LinearHash`: training-free random-projection sign hashing (MagicPIG / the paper's "linear hashing"), one
  Gaussian projection per KV head shared by the keys and the group's queries; any number of bits.

`HashStack` holds one hash module per non-dense layer. `export_hashes` / `load_hashes` write and read it with orbax
plus a JSON config that is validated against the `ModelConfig` it is loaded for.

Axis legend: B batch, T query len, S kv len, N q-heads, K kv-heads, G group, H head_dim, M rows, W packed words.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels as _kernels
from pallas_kernels.hash_mlp import HashMLP, hash_mlp_reference
from spotlight_jax._io import atomic_dir, read_json, verify_sums, write_sums
from spotlight_jax.config import ModelConfig, RetrievalConfig

VALID_SPOTLIGHT_BITS = (32, 64, 128, 256)
HASH_CONFIG_FILE = "hash_config.json"
HASH_PARAMS_DIR = "params"
FORMAT_VERSION = 1

# The kernel package owns the packing convention (bit i of word w = x[..., 32 w + i] > 0): `pack_bits` is its op
# (Pallas on GPU, XLA elsewhere), `pack_bits_reference` its jnp reference.
pack_bits = _kernels.pack_bits
pack_bits_reference = _kernels.pack_bits_reference


def softsign(x: jax.Array) -> jax.Array:
    return x / (1.0 + jnp.abs(x))


def default_hash_dims(head_dim: int, bits: int = 128, hidden: int = 128) -> tuple[int, ...]:
    """Paper defaults: 128->128->128 for head_dim 128; 64->128->128 for head_dim 64 (codes stay 128 bits)."""
    return (head_dim, hidden, bits)


@dataclasses.dataclass(frozen=True)
class HashConfig:
    """What hash module to build for every non-dense layer (static, hashable, serialised into the export)."""

    kind: str = "spotlight"  # "spotlight" | "linear"
    bits: int = 128
    hidden: int = 128  # width of the MLP's hidden layer(s) (spotlight)
    num_mlp_layers: int = 2  # number of linear layers in the MLP (spotlight)
    residual: bool = True  # add x to a layer's output where its input and output widths match (spotlight)
    init_scale: float = 1e-3  # std of the weight init (spotlight)
    separate_query_mlp: bool = False  # spotlight: one extra MLP per query head for queries (keys keep the KV head's)

    def __post_init__(self):
        if self.kind not in ("spotlight", "linear"):
            raise ValueError(f"hash kind must be 'spotlight' or 'linear', got {self.kind!r}")
        if self.kind == "spotlight" and self.bits not in VALID_SPOTLIGHT_BITS:
            raise ValueError(f"spotlight bits must be one of {VALID_SPOTLIGHT_BITS}, got {self.bits}")
        if self.bits <= 0 or self.bits % 32:
            raise ValueError(f"bits must be a positive multiple of 32, got {self.bits}")
        if self.num_mlp_layers < 1:
            raise ValueError(f"num_mlp_layers must be >= 1, got {self.num_mlp_layers}")

    def dims(self, head_dim: int) -> tuple[int, ...]:
        if self.kind == "linear":
            return (head_dim, self.bits)
        return (head_dim,) + (self.hidden,) * (self.num_mlp_layers - 1) + (self.bits,)


class Projection(nnx.Variable):
    """A fixed (not trained) random projection: excluded from `nnx.Param` so no optimizer touches it."""


class _HashBase(nnx.Module):
    """Shared code/soft-code plumbing; subclasses implement `_apply(x [K, ..., M, H], which) -> [K, ..., M, bits]`."""

    num_kv_heads: int
    num_heads: int
    head_dim: int
    bits: int

    # --- core: features with the KV-head axis first -------------------------------------------------------------
    def _apply(self, x: jax.Array, per_query_head: bool) -> jax.Array:
        raise NotImplementedError

    def _check_last(self, x: jax.Array):
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"expected head_dim {self.head_dim} on the last axis, got shape {x.shape}")

    def key_features(self, k: jax.Array) -> jax.Array:
        """k: [B, K, T, H] (or any [..., K, T, H]) -> float [..., K, T, bits]."""
        self._check_last(k)
        if k.ndim < 3 or k.shape[-3] != self.num_kv_heads:
            raise ValueError(f"keys must be [..., K={self.num_kv_heads}, T, H={self.head_dim}], got shape {k.shape}")
        x = jnp.moveaxis(k, -3, 0)  # [K, ..., T, H]
        return jnp.moveaxis(self._apply(x, per_query_head=False), 0, -3)

    def query_features(self, q: jax.Array) -> jax.Array:
        """q: [B, N, ..., H] -> float [B, N, ..., bits]; query head j is hashed with KV head j // G's function."""
        self._check_last(q)
        if q.ndim < 3 or q.shape[1] != self.num_heads:
            raise ValueError(f"queries must be [B, N={self.num_heads}, ..., H={self.head_dim}], got shape {q.shape}")
        b, n, *rest, h = q.shape
        kk, g = self.num_kv_heads, self.num_heads // self.num_kv_heads
        rows = int(np.prod(rest)) if rest else 1
        if self._has_query_mlp():
            x = jnp.moveaxis(q.reshape(b, n, rows, h), 1, 0)  # [N, B, M, H]
            y = jnp.moveaxis(self._apply(x, per_query_head=True), 0, 1)  # [B, N, M, bits]
        else:
            x = jnp.moveaxis(q.reshape(b, kk, g * rows, h), 1, 0)  # [K, B, G*M, H]
            y = jnp.moveaxis(self._apply(x, per_query_head=False), 0, 1)  # [B, K, G*M, bits]
        return y.reshape(b, n, *rest, self.bits)

    def _has_query_mlp(self) -> bool:
        return False

    def mlp(self) -> HashMLP | None:
        """The key hash as per-KV-head layers (what `pallas_kernels.decode_prologue` runs), or None when the
        queries have a function of their own (then the decode step hashes them unfused)."""
        raise NotImplementedError

    def features(self, x: jax.Array) -> jax.Array:
        """Generic entry point: x [..., K, M, H] with the KV-head axis third from last -> [..., K, M, bits]."""
        return self.key_features(x)

    # --- packed codes (what the decoder stores and compares) ----------------------------------------------------
    def codes(self, x: jax.Array) -> jax.Array:
        """x: [..., K, M, H] -> uint32 [..., K, M, W]."""
        return pack_bits(self.features(x))

    def key_codes(self, k: jax.Array) -> jax.Array:
        """k: [B, K, T, H] -> uint32 [B, K, T, W]."""
        return pack_bits(self.key_features(k))

    def query_codes(self, q: jax.Array) -> jax.Array:
        """q: [B, N, ..., H] -> uint32 [B, N, ..., W]."""
        return pack_bits(self.query_features(q))

    # --- relaxed codes for training: softsign(gamma * h(x)) in (-1, 1) ------------------------------------------
    def soft_codes(self, x: jax.Array, gamma: float = 64.0) -> jax.Array:
        return softsign(gamma * self.features(x))

    def soft_key_codes(self, k: jax.Array, gamma: float = 64.0) -> jax.Array:
        return softsign(gamma * self.key_features(k))

    def soft_query_codes(self, q: jax.Array, gamma: float = 64.0) -> jax.Array:
        return softsign(gamma * self.query_features(q))


class SpotlightHash(_HashBase):
    """Learned hash MLP for one layer: K stacked per-KV-head MLPs (optionally N per-query-head query MLPs).

    Layer l maps dims[l] -> dims[l+1] with weights [K, dims[l], dims[l+1]] and biases [K, dims[l+1]]; SiLU follows
    the first layer only; a residual `x + f(x)` is added where widths match (`residual=True`). With the paper's
    init scale 1e-3 the untrained function is close to the identity (128-d heads) or a random projection (64-d).
    """

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        *,
        num_heads: int | None = None,
        bits: int = 128,
        dims: Sequence[int] | None = None,
        residual: bool = True,
        init_scale: float = 1e-3,
        separate_query_mlp: bool = False,
        rngs: nnx.Rngs,
    ):
        dims = tuple(dims) if dims is not None else default_hash_dims(head_dim, bits)
        if dims[0] != head_dim or dims[-1] != bits or len(dims) < 2:
            raise ValueError(f"hash dims {dims} must start at head_dim={head_dim} and end at bits={bits}")
        if bits not in VALID_SPOTLIGHT_BITS:
            raise ValueError(f"spotlight bits must be one of {VALID_SPOTLIGHT_BITS}, got {bits}")
        self.num_kv_heads, self.head_dim, self.bits = num_kv_heads, head_dim, bits
        self.num_heads = num_heads or num_kv_heads
        if self.num_heads % num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.dims, self.residual, self.init_scale = dims, residual, init_scale
        self.separate_query_mlp = separate_query_mlp
        self.key_mlp = _StackedMLP(num_kv_heads, dims, residual, init_scale, rngs)
        self.query_mlp = _StackedMLP(self.num_heads, dims, residual, init_scale, rngs) if separate_query_mlp else None

    def _has_query_mlp(self) -> bool:
        return self.query_mlp is not None

    def _apply(self, x: jax.Array, per_query_head: bool) -> jax.Array:
        mlp = self.query_mlp if per_query_head else self.key_mlp
        return mlp(x)

    def mlp(self) -> HashMLP | None:
        return None if self.query_mlp is not None else self.key_mlp.layers()


class _StackedMLP(nnx.Module):
    """`heads` independent MLPs applied with einsums over a leading head axis."""

    def __init__(self, heads: int, dims: tuple[int, ...], residual: bool, init_scale: float, rngs: nnx.Rngs):
        self.dims, self.residual = dims, residual
        ws, bs = [], []
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            ws.append(nnx.Param(init_scale * jax.random.normal(rngs.params(), (heads, d_in, d_out), jnp.float32)))
            bs.append(nnx.Param(jnp.zeros((heads, d_out), jnp.float32)))
        self.weights = nnx.List(ws)  # each [K, Din, Dout]
        self.biases = nnx.List(bs)  # each [K, Dout]

    def layers(self) -> HashMLP:
        # The paper's MLP has a nonlinearity (SiLU) after the first layer only.
        weights = tuple(w[...] for w in self.weights)
        return HashMLP(weights, tuple(b[...] for b in self.biases), silu_first=True, residual=self.residual)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [K, ..., M, Din] -> [K, ..., M, Dout]; computed in fp32 whatever the activation dtype."""
        y = hash_mlp_reference(x.reshape(x.shape[0], -1, x.shape[-1]), self.layers())  # [K, M', Dout]
        return y.reshape(*x.shape[:-1], y.shape[-1])


class LinearHash(_HashBase):
    """Random-projection sign hashing (training-free): codes = sign(x @ P_k), P_k ~ N(0, 1) per KV head."""

    def __init__(self, num_kv_heads: int, head_dim: int, *, num_heads: int | None = None, bits: int = 128, rngs):
        if bits <= 0 or bits % 32:
            raise ValueError(f"bits must be a positive multiple of 32, got {bits}")
        self.num_kv_heads, self.head_dim, self.bits = num_kv_heads, head_dim, bits
        self.num_heads = num_heads or num_kv_heads
        self.dims = (head_dim, bits)
        self.projection = Projection(jax.random.normal(rngs.params(), (num_kv_heads, head_dim, bits), jnp.float32))

    def _apply(self, x: jax.Array, per_query_head: bool) -> jax.Array:
        y = hash_mlp_reference(x.reshape(x.shape[0], -1, x.shape[-1]), self.mlp())  # [K, M', bits]
        return y.reshape(*x.shape[:-1], self.bits)

    def mlp(self) -> HashMLP:
        return HashMLP((self.projection[...],), (None,), silu_first=False, residual=False)


def build_hash(hash_cfg: HashConfig, model_cfg: ModelConfig, rngs: nnx.Rngs) -> SpotlightHash | LinearHash:
    """One layer's hash module for `model_cfg`'s head layout."""
    k, n, h = model_cfg.num_kv_heads, model_cfg.num_heads, model_cfg.head_dim
    if hash_cfg.kind == "linear":
        return LinearHash(k, h, num_heads=n, bits=hash_cfg.bits, rngs=rngs)
    return SpotlightHash(
        k, h, num_heads=n, bits=hash_cfg.bits, dims=hash_cfg.dims(h), residual=hash_cfg.residual,
        init_scale=hash_cfg.init_scale, separate_query_mlp=hash_cfg.separate_query_mlp, rngs=rngs,
    )  # fmt: skip


def non_dense_layers(num_layers: int, dense_layers: Sequence[int] = (0, 1)) -> tuple[int, ...]:
    return tuple(i for i in range(num_layers) if i not in set(dense_layers))


class HashStack(nnx.Module):
    """One hash module per non-dense layer; `for_layer(i)` returns layer i's module (KeyError for dense layers)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        hash_cfg: HashConfig = HashConfig(),
        *,
        layers: Sequence[int] | None = None,
        dense_layers: Sequence[int] = (0, 1),
        rngs: nnx.Rngs,
    ):
        layers = tuple(layers) if layers is not None else non_dense_layers(model_cfg.num_layers, dense_layers)
        bad = [i for i in layers if not 0 <= i < model_cfg.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range for a {model_cfg.num_layers}-layer model")
        self.model_cfg, self.hash_cfg, self.layers = model_cfg, hash_cfg, tuple(sorted(set(layers)))
        # Each layer gets its own stream so a layer's init does not depend on which other layers exist.
        key = rngs.params()
        self.hashes = nnx.List(
            [build_hash(hash_cfg, model_cfg, nnx.Rngs(params=jax.random.fold_in(key, i))) for i in self.layers]
        )

    def for_layer(self, layer: int) -> SpotlightHash | LinearHash:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} has no hash module (dense or not trained); hashed layers: {self.layers}")
        return self.hashes[self.layers.index(layer)]

    def __contains__(self, layer: int) -> bool:
        return layer in self.layers

    @property
    def bits(self) -> int:
        return self.hash_cfg.bits


# ----------------------------------------------------------------------------------------------------------------
# Export / load
# ----------------------------------------------------------------------------------------------------------------


def stack_meta(stack: HashStack, **extra: Any) -> dict[str, Any]:
    """The JSON config written beside the params (validated by `load_hashes`)."""
    cfg = stack.model_cfg
    return {
        "format_version": FORMAT_VERSION,
        "model_name": cfg.name,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "layers": list(stack.layers),
        "bits": stack.hash_cfg.bits,
        "dims": list(stack.hash_cfg.dims(cfg.head_dim)),
        "hash_config": dataclasses.asdict(stack.hash_cfg),
        **extra,
    }


def _pure_params(stack: HashStack) -> dict[str, Any]:
    return {f"layer_{i:03d}": nnx.to_pure_dict(nnx.state(stack.for_layer(i))) for i in stack.layers}


class HashCheckpointError(ValueError):
    """An exported hash checkpoint is missing, corrupt, or does not fit the model it is loaded for."""


def _check_finite(params: dict[str, Any], what: str) -> None:
    for layer, tree in params.items():
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            if not np.isfinite(np.asarray(x)).all():
                raise HashCheckpointError(
                    f"{what}: {layer}{jax.tree_util.keystr(path)} holds NaN or inf (a diverged run or a damaged "
                    "checkpoint): retrain that layer or restore an intact copy"
                )


def is_hash_export(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a folder written by `export_hashes` (has its JSON config)."""
    return os.path.isfile(os.path.join(os.fspath(path), HASH_CONFIG_FILE))


def export_hashes(path: str | os.PathLike, stack: HashStack, meta: dict[str, Any] | None = None) -> str:
    """Write `path/params` (orbax), `path/hash_config.json` and checksums of both. `meta` adds e.g. training data /
    steps to the JSON.

    All-or-nothing: the export is written beside `path` and renamed into place, so an interrupted re-export leaves
    the previous one whole. An existing `path` must be an earlier export (or empty); non-finite parameters are
    refused before anything is written.
    """
    import orbax.checkpoint as ocp

    params = jax.device_get(_pure_params(stack))
    _check_finite(params, "not exporting the hashes")
    info = stack_meta(stack, **(meta or {}))
    path = os.path.abspath(os.fspath(path))
    with atomic_dir(path, "a hash export", is_hash_export) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, HASH_PARAMS_DIR), params, force=True)
            ckptr.wait_until_finished()
        with open(os.path.join(tmp, HASH_CONFIG_FILE), "w") as f:
            json.dump(info, f, indent=2, default=str)
        write_sums(tmp)
    return path


def read_hash_config(path: str | os.PathLike) -> dict[str, Any]:
    return read_json(
        os.path.join(os.fspath(path), HASH_CONFIG_FILE), HashCheckpointError,
        f"no {HASH_CONFIG_FILE} in {path!s}: not an exported hash checkpoint "
        "(train one with `python -m spotlight_jax.train`)",
    )  # fmt: skip


def load_hashes(
    path: str | os.PathLike,
    model_cfg: ModelConfig,
    retrieval_cfg: RetrievalConfig | None = None,
    *,
    bits: int | None = None,
) -> HashStack:
    """Load an exported `HashStack` and check it fits `model_cfg` (and `retrieval_cfg`'s bits / dense layers)."""
    import orbax.checkpoint as ocp

    if not os.fspath(path).strip():
        raise HashCheckpointError("empty hash checkpoint path: pass the folder written by export_hashes")
    path = os.path.abspath(os.fspath(path))
    info = read_hash_config(path)
    try:
        problem = verify_sums(path)
    except FileNotFoundError:
        problem = None  # exported before checksums were written: the shape and finiteness checks below still run
    if problem:
        raise HashCheckpointError(f"hash checkpoint {path} is damaged: {problem}; export it again")
    expect = {
        "num_layers": model_cfg.num_layers,
        "num_heads": model_cfg.num_heads,
        "num_kv_heads": model_cfg.num_kv_heads,
        "head_dim": model_cfg.head_dim,
    }
    wrong = {k: (info.get(k), v) for k, v in expect.items() if info.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in wrong.items())
        raise HashCheckpointError(
            f"hash checkpoint {path} was trained for {info.get('model_name') or 'another model'!r}, "
            f"not {model_cfg.name or 'this model'!r} ({detail})"
        )
    want_bits = bits if bits is not None else (retrieval_cfg.bits if retrieval_cfg is not None else None)
    if want_bits is not None and info.get("bits") != want_bits:
        raise HashCheckpointError(f"hash checkpoint {path} has {info.get('bits')}-bit codes, but {want_bits} asked")
    layers = tuple(info.get("layers", ()))
    if retrieval_cfg is not None:
        retrieval_cfg.check_layers(model_cfg.num_layers)
        need = non_dense_layers(model_cfg.num_layers, retrieval_cfg.dense_layers)
        missing = sorted(set(need) - set(layers))
        if missing:
            raise HashCheckpointError(
                f"hash checkpoint {path} has no hash for layers {missing} (it covers {list(layers)}; the retrieval "
                f"config keeps layers {list(retrieval_cfg.dense_layers)} dense)"
            )
    try:
        hash_cfg = HashConfig(**info["hash_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise HashCheckpointError(f"corrupt hash_config in {path}/{HASH_CONFIG_FILE}: {e}") from e
    if list(hash_cfg.dims(model_cfg.head_dim)) != list(info.get("dims", [])):
        raise HashCheckpointError(f"{path}: dims {info.get('dims')} disagree with hash_config {hash_cfg}")

    abstract = nnx.eval_shape(lambda: HashStack(model_cfg, hash_cfg, layers=layers, rngs=nnx.Rngs(0)))
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _pure_params(abstract), is_leaf=lambda x: hasattr(x, "shape")
    )
    params_dir = os.path.join(path, HASH_PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise HashCheckpointError(
            f"hash checkpoint {path} has no {HASH_PARAMS_DIR}/ folder (missing or partial export)"
        )
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(params_dir, target)
    except Exception as e:  # orbax raises many types for truncated / mismatched files
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        raise HashCheckpointError(
            f"could not restore hash params from {params_dir} ({type(e).__name__}: {msg}): the params do not match "
            f"{HASH_CONFIG_FILE} or are damaged; export them again"
        ) from e
    # Orbax fills the target's structure; a stored tree with other keys or shapes must not pass unnoticed.
    want = jax.tree.map(lambda x: x.shape, target)
    got = jax.tree.map(lambda x: np.shape(x), restored)
    if jax.tree.structure(want) != jax.tree.structure(got) or jax.tree.leaves(want) != jax.tree.leaves(got):
        raise HashCheckpointError(
            f"hash params in {params_dir} do not have the shapes {HASH_CONFIG_FILE} describes ({hash_cfg.bits} bits, "
            f"dims {list(hash_cfg.dims(model_cfg.head_dim))}): the folder mixes two exports; export it again"
        )
    _check_finite(restored, f"hash checkpoint {path}")
    stack = HashStack(model_cfg, hash_cfg, layers=layers, rngs=nnx.Rngs(0))
    for i in layers:
        state = nnx.state(stack.for_layer(i))
        nnx.replace_by_pure_dict(state, restored[f"layer_{i:03d}"])
        nnx.update(stack.for_layer(i), state)
    return stack
