"""Cached post-RoPE queries/keys of a frozen model, on disk, for layer-by-layer hash training.

Layout of an activation folder:

    manifest.json            model name + config, sample count, seq length, dtype, layers, `completed` samples
    tokens.npy               int32 [num_samples, T]: the samples (checked on resume)
    layer_007_q.npy          uint16 [num_samples, N, T, H]: bf16 bit patterns (numpy has no bf16; read back as
    layer_007_k.npy          uint16 [num_samples, K, T, H]   `ml_dtypes.bfloat16` views of read-only memmaps)

`collect_activations` fills the files batch by batch and bumps `completed` in the manifest after each flushed batch,
so an interrupted collection resumes where it stopped. `ActivationReader` memory-maps the files, so training reads
one batch at a time and never holds the cache in RAM.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from spotlight_jax._io import DiskFullError, dir_lock, disk_guard, read_json, write_json_atomic
from spotlight_jax.config import ModelConfig

MANIFEST = "manifest.json"
TOKENS_FILE = "tokens.npy"
LOCK_FILE = "collect.lock"
_FINGERPRINT_SAMPLES = 1024  # values read per parameter tensor for the weights fingerprint
FORMAT_VERSION = 1
_STORAGE = {"bfloat16": (np.uint16, ml_dtypes.bfloat16), "float32": (np.float32, np.float32)}


class ActivationCacheError(ValueError):
    """An activation folder is missing, incomplete, or does not match what was asked for."""


def layer_file(layer: int, which: str) -> str:
    return f"layer_{layer:03d}_{which}.npy"


def tokens_fingerprint(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int32).tobytes()).hexdigest()[:16]


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    return read_json(
        os.path.join(os.fspath(out_dir), MANIFEST), ActivationCacheError,
        f"no {MANIFEST} in {out_dir!s}: not an activation cache (create one with collect_activations or "
        "`python -m spotlight_jax.train`)",
    )  # fmt: skip


def weights_fingerprint(model) -> str:
    """sha256 of the model's config (its name aside) and of 1024 evenly spaced values of every parameter tensor.

    Cheap (one small gather per tensor) and exact across machines (raw values, no float sums): it tells another
    model, another checkpoint of the same architecture or another parameter dtype apart. It is an identity, not a
    corruption check: a change confined to values it does not sample goes unseen.
    """
    h = hashlib.sha256(json.dumps({**model.cfg.to_dict(), "name": ""}, sort_keys=True).encode())
    for path, var in sorted(nnx.to_flat_state(nnx.state(model)), key=lambda kv: tuple(map(str, kv[0]))):
        x = var[...]
        flat = jnp.reshape(x, (-1,))
        idx = np.unique(np.linspace(0, max(flat.size - 1, 0), _FINGERPRINT_SAMPLES).round().astype(np.int64))
        sample = np.asarray(flat[idx]) if flat.size else np.zeros(0)
        h.update(f"{'.'.join(map(str, path))}|{tuple(x.shape)}|{x.dtype}|".encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:16]


def _write_manifest(out_dir: str, manifest: dict[str, Any]) -> None:
    write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)  # a crash never leaves a half-written manifest


def same_source(recorded: dict[str, Any] | None, now: dict[str, Any] | None) -> bool:
    """Whether two `convert.describe_source` records name the same model: by the weight files' fingerprint when
    both have one (a moved folder is the same model, another model at the same path is not), else by name."""
    if not recorded or not now:
        return recorded == now
    if recorded.get("files_sha256") and now.get("files_sha256"):
        return recorded["files_sha256"] == now["files_sha256"]
    return recorded.get("model") == now.get("model")


def _check_same(manifest: dict[str, Any], expect: dict[str, Any], out_dir: str) -> None:
    def differs(k, v):
        return not same_source(manifest.get(k), v) if k == "model_source" else manifest.get(k) != v

    wrong = {k: (manifest.get(k), v) for k, v in expect.items() if differs(k, v)}
    if wrong:
        detail = "; ".join(f"{k}: on disk {a!r} vs now {b!r}" for k, (a, b) in wrong.items())
        raise ActivationCacheError(
            f"the activation cache in {out_dir} was made with different settings ({detail}). "
            "Use another folder or delete this one."
        )


def collect_activations(
    model,
    samples: np.ndarray,
    out_dir: str | os.PathLike,
    layers: Sequence[int] | None = None,
    *,
    batch_size: int = 1,
    dtype: str = "bfloat16",
    model_name: str | None = None,
    data_info: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    progress: bool = True,
) -> ActivationReader:
    """Run the frozen `model` over `samples` (int [num, T]) and store post-RoPE q/k of `layers` under `out_dir`.

    Resumable: an existing folder made with the same model (config and weights fingerprint), samples, layers and
    dtype continues from its `completed` count; a different one raises `ActivationCacheError`. `source` (what
    `convert.describe_source` says of the model's origin) is recorded and, when given, must match on resume. The
    disk space the cache needs is checked and reserved before anything is written, and the folder is locked while
    collecting. Returns an `ActivationReader`.
    """
    samples = np.asarray(samples)
    if samples.ndim != 2 or not np.issubdtype(samples.dtype, np.integer):
        raise ValueError(f"samples must be an integer array [num_samples, T], got {samples.dtype} {samples.shape}")
    if dtype not in _STORAGE:
        raise ValueError(f"dtype must be one of {sorted(_STORAGE)}, got {dtype!r}")
    cfg: ModelConfig = model.cfg
    layers = tuple(sorted(set(layers))) if layers is not None else tuple(range(cfg.num_layers))
    if any(not 0 <= i < cfg.num_layers for i in layers):
        raise ValueError(f"layers {layers} out of range for a {cfg.num_layers}-layer model")
    num, seq_len = samples.shape
    if num == 0:
        raise ValueError("no samples to collect activations for")
    if samples.size and (samples.min() < 0 or samples.max() >= cfg.vocab_size):
        raise ValueError(
            f"samples hold token ids outside the model's vocabulary [0, {cfg.vocab_size}) (found {samples.min()}.."
            f"{samples.max()}): they were tokenised for another model"
        )
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(
            f"samples of {seq_len} tokens exceed the model's {cfg.max_position_embeddings} positions (its activations "
            "there are not what decoding sees): lower seq_len"
        )
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with dir_lock(out_dir, LOCK_FILE, "activation collection"):
        return _collect_locked(
            model, samples, out_dir, layers, batch_size=batch_size, dtype=dtype, model_name=model_name,
            data_info=data_info, source=source, progress=progress,
        )  # fmt: skip


def _collect_locked(model, samples, out_dir, layers, *, batch_size, dtype, model_name, data_info, source, progress):
    cfg: ModelConfig = model.cfg
    num, seq_len = samples.shape
    storage, _ = _STORAGE[dtype]
    n, kh, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    expect = {
        "format_version": FORMAT_VERSION,
        "model_config": json.loads(json.dumps(cfg.to_dict())),
        "model_weights_sha256": weights_fingerprint(model),
        "num_samples": num,
        "seq_len": seq_len,
        "dtype": dtype,
        "layers": list(layers),
        "tokens_sha256": tokens_fingerprint(samples),
    }
    if source is not None:
        expect["model_source"] = json.loads(json.dumps(source))
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        manifest = read_manifest(out_dir)
        _check_same(manifest, expect, out_dir)
        mode = "r+"
    else:
        manifest = {
            **expect,
            "model_name": model_name or cfg.name,
            "data": data_info or {},
            "completed": 0,
            "shapes": {"q": [num, n, seq_len, h], "k": [num, kh, seq_len, h]},
        }
        mode = "w+"
    shapes = {(i, which): (num, heads, seq_len, h) for i in layers for which, heads in (("q", n), ("k", kh))}
    if mode == "w+":
        _check_free_space(out_dir, sum(int(np.prod(s)) for s in shapes.values()) * np.dtype(storage).itemsize)
    files: dict[tuple[int, str], np.memmap] = {}
    created: list[str] = []

    def remove_created(files=files):  # a cache that could not be made whole leaves nothing behind
        files.clear()  # closes the maps before their files go
        for p in created:
            with contextlib.suppress(OSError):
                os.remove(p)

    with disk_guard(f"creating the activation cache in {out_dir}", remove_created if mode == "w+" else None):
        if mode == "w+":
            created.append(os.path.join(out_dir, TOKENS_FILE))
            np.save(created[-1], samples.astype(np.int32))
        for (i, which), shape in shapes.items():
            path = os.path.join(out_dir, layer_file(i, which))
            if mode == "r+" and not os.path.exists(path):
                raise ActivationCacheError(f"{path} is missing although the manifest lists layer {i}; delete {out_dir}")
            if mode == "w+":
                created.append(path)
            files[i, which] = np.lib.format.open_memmap(
                path, mode=mode, dtype=storage, shape=shape if mode == "w+" else None
            )
            if mode == "w+":
                _reserve(path)
        if mode == "w+":
            _write_manifest(out_dir, manifest)

    start = int(manifest["completed"])
    if start < num:
        graphdef, state = nnx.split(model)
        store_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32

        @jax.jit
        def forward(state, tokens):  # tokens [B, T] -> {layer: (q [B, N, T, H], k [B, K, T, H])}
            out = nnx.merge(graphdef, state)(tokens, return_qk=layers, logits="last")
            return {i: (q.astype(store_dtype), k.astype(store_dtype)) for i, (q, k) in out.qk.items()}

        bar = tqdm(total=num, initial=start, desc="activations", unit="sample", disable=not progress)
        for lo in range(start, num, batch_size):
            hi = min(num, lo + batch_size)
            batch = samples[lo:hi]
            if hi - lo < batch_size:  # keep one compiled shape: pad the last batch with copies
                batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - (hi - lo), axis=0)])
            qk = jax.device_get(forward(state, jnp.asarray(batch, jnp.int32)))
            for i in layers:
                for which, x in zip(("q", "k"), qk[i], strict=True):
                    files[i, which][lo:hi] = np.asarray(x[: hi - lo]).view(storage)
            for f in files.values():
                f.flush()
            manifest["completed"] = hi
            with disk_guard(f"updating {MANIFEST} in {out_dir} (the samples so far are kept)"):
                _write_manifest(out_dir, manifest)
            bar.update(hi - lo)
        bar.close()
    del files
    return ActivationReader(out_dir)


def _check_free_space(out_dir: str, nbytes: int) -> None:
    free = shutil.disk_usage(out_dir).free
    if nbytes > free:
        raise DiskFullError(
            errno.ENOSPC,
            f"the activation cache needs {nbytes / 2**30:.2f} GiB but {out_dir} has {free / 2**30:.2f} GiB free: "
            "free some space, or pass fewer samples / layers or another --activations-dir",
        )


def _reserve(path: str) -> None:
    """Allocate the memmap's blocks now: writing through a memory map onto a full disk kills the process with
    SIGBUS instead of raising, so the space must be taken while an error is still an exception."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        # EOPNOTSUPP etc.: a filesystem without fallocate; the free-space check above is all there is
    finally:
        os.close(fd)


class ActivationReader:
    """Memory-mapped read access to an activation folder: `get(layer, indices) -> (q, k)` numpy bf16 arrays."""

    def __init__(self, out_dir: str | os.PathLike, *, require_complete: bool = True):
        self.out_dir = os.fspath(out_dir)
        if not os.path.isdir(self.out_dir):
            raise ActivationCacheError(f"activation folder {self.out_dir} does not exist")
        self.manifest = read_manifest(self.out_dir)
        m = self.manifest
        try:
            self.model_cfg = ModelConfig.from_dict(m["model_config"])
            self.layers = tuple(m["layers"])
            self.seq_len = int(m["seq_len"])
            self.total_samples = int(m["num_samples"])
            self.completed = int(m["completed"])
            self.dtype = m["dtype"]
            storage, self.np_dtype = _STORAGE[self.dtype]
        except (KeyError, TypeError, ValueError) as e:
            raise ActivationCacheError(f"corrupt {MANIFEST} in {self.out_dir}: {type(e).__name__}: {e}") from e
        if require_complete and self.completed < self.total_samples:
            raise ActivationCacheError(
                f"activation cache {self.out_dir} is incomplete ({self.completed}/{self.total_samples} samples); "
                "rerun collection to finish it"
            )
        if self.completed == 0:
            raise ActivationCacheError(f"activation cache {self.out_dir} holds no samples yet")
        self._storage = storage
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    @property
    def num_samples(self) -> int:
        return self.completed

    @property
    def model_name(self) -> str:
        return self.manifest.get("model_name", self.model_cfg.name)

    def _map(self, layer: int, which: str) -> np.ndarray:
        if layer not in self.layers:
            raise ActivationCacheError(f"layer {layer} is not in the activation cache {self.out_dir} ({self.layers})")
        if (layer, which) not in self._maps:
            path = os.path.join(self.out_dir, layer_file(layer, which))
            if not os.path.exists(path):
                raise ActivationCacheError(f"{path} is missing")
            arr = np.load(path, mmap_mode="r")
            cfg = self.model_cfg
            heads = cfg.num_heads if which == "q" else cfg.num_kv_heads
            want = (self.total_samples, heads, self.seq_len, cfg.head_dim)
            if arr.shape != want or arr.dtype != self._storage:
                raise ActivationCacheError(f"{path} has {arr.dtype} {arr.shape}, manifest says {self._storage} {want}")
            self._maps[layer, which] = arr
        return self._maps[layer, which]

    def get(self, layer: int, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (q [B, N, T, H], k [B, K, T, H]) as `ml_dtypes.bfloat16` (or float32) arrays, copied from disk."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.completed):
            raise IndexError(f"sample indices {idx} out of range [0, {self.completed})")
        order = np.argsort(idx)  # sorted reads are friendlier to the page cache
        q = np.empty((idx.size,) + self._map(layer, "q").shape[1:], self._storage)
        k = np.empty((idx.size,) + self._map(layer, "k").shape[1:], self._storage)
        q[order] = self._map(layer, "q")[idx[order]]
        k[order] = self._map(layer, "k")[idx[order]]
        return q.view(self.np_dtype), k.view(self.np_dtype)

    def tokens(self) -> np.ndarray:
        return np.load(os.path.join(self.out_dir, TOKENS_FILE), mmap_mode="r")


class ArrayActivations:
    """In-memory stand-in for `ActivationReader` (tests, synthetic benchmarks): dict layer -> (q [S,N,T,H], k)."""

    def __init__(self, model_cfg: ModelConfig, qk: dict[int, tuple[np.ndarray, np.ndarray]], name: str = "synthetic"):
        self.model_cfg = model_cfg
        self._qk = qk
        self.layers = tuple(sorted(qk))
        first = qk[self.layers[0]][0]
        self.num_samples, self.seq_len = first.shape[0], first.shape[2]
        self.model_name = name
        self.out_dir = None
        self.manifest = {"model_name": name, "num_samples": self.num_samples, "seq_len": self.seq_len}

    def get(self, layer: int, indices) -> tuple[np.ndarray, np.ndarray]:
        q, k = self._qk[layer]
        idx = np.asarray(indices)
        return q[idx], k[idx]


def synthetic_activations(
    model_cfg: ModelConfig, layers: Sequence[int], num_samples: int, seq_len: int, seed: int = 0, dtype=np.float32
) -> ArrayActivations:
    """Random q/k with a little structure (a shared low-rank component and RoPE-like rotation), for tests/benchmarks.

    Not real activations: useful for shapes, speed, and checking that training lowers the loss.
    """
    rng = np.random.default_rng(seed)
    n, kh, h = model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.head_dim
    pos = np.arange(seq_len)[:, None]
    freq = 1.0 / (10000.0 ** (np.arange(h // 2) / (h // 2)))
    cos, sin = np.cos(pos * freq), np.sin(pos * freq)  # [T, H/2]

    def rope(x):  # x [..., T, H]
        a, b = x[..., : h // 2], x[..., h // 2 :]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)

    out = {}
    for i in layers:
        base = rng.standard_normal((num_samples, 1, seq_len, h)).astype(np.float32)
        q = rope(0.7 * base + rng.standard_normal((num_samples, n, seq_len, h)).astype(np.float32))
        k = rope(0.7 * base + rng.standard_normal((num_samples, kh, seq_len, h)).astype(np.float32))
        out[i] = (q.astype(dtype), k.astype(dtype))
    return ArrayActivations(model_cfg, out)
