"""Train Spotlight hash MLPs layer by layer on cached activations (the LLM stays frozen).

    python -m spotlight_jax.train                                   # SmolLM2-135M on the stdlib corpus, CPU, ~20 min
    python -m spotlight_jax.train --config configs/qwen2.5-7b.json --model /path/to/Qwen2.5-7B
    python -m spotlight_jax.train --steps-per-layer 50 --bits 64 --out-dir runs/h64

Pipeline: samples (`spotlight_jax.data`) -> activation cache (`spotlight_jax.activations`, reused when it exists)
-> for each non-dense layer: AdamW on the Bradley–Terry loss (`spotlight_jax.losses`) -> orbax checkpoints (resumed
after an interruption) -> `export_hashes` (loadable with `hashing.load_hashes`). `train(cfg)` is the library entry
point; `main()` only parses flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from spotlight_jax import activations as _acts
from spotlight_jax._io import (
    check_folder_path,
    dir_lock,
    disk_guard,
    read_json,
    verify_sums,
    write_json_atomic,
    write_sums,
)
from spotlight_jax.activations import ActivationCacheError, ActivationReader, collect_activations, read_manifest
from spotlight_jax.config import ModelConfig
from spotlight_jax.data import PARTS
from spotlight_jax.hashing import HashConfig, HashStack, export_hashes, is_hash_export, non_dense_layers
from spotlight_jax.losses import LossConfig, bradley_terry_loss

DEFAULT_CONFIG = "configs/smollm2-135m.json"


def _f(default, help: str, **kw):
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Defaults = the CPU default run (configs/smollm2-135m.json)."""

    # --- model and data ---
    model: str | None = _f(
        None, "model to collect activations from: None = embedded SmolLM2-135M; folder, .gguf or hub id"
    )
    model_dtype: str = _f("float32", "compute dtype of the frozen model while collecting activations")
    dataset: str = _f("stdlib", "'stdlib' (offline Python sources), local .jsonl/.json/.txt/.parquet(.gz) or hub name")
    text_field: str = _f("text", "text column of the dataset")
    data_part: str = _f(
        "train", "documents to use: all | train | heldout (deterministic split; train keeps `eval` honest)"
    )
    heldout_fraction: float = _f(0.2, "share of documents held out when data_part is train/heldout")
    allow_download: bool = _f(False, "allow downloading a hub dataset / model")
    num_samples: int = _f(12, "number of fixed-length samples to cache")
    seq_len: int = _f(2048, "tokens per sample")
    activations_dir: str | None = _f(
        None, "activation cache folder (default <out_dir>/activations); reused if complete"
    )
    collect_batch_size: int = _f(1, "samples per forward pass while collecting activations")
    # --- hash module ---
    bits: int = _f(128, "code length (32, 64, 128, 256)")
    hidden: int = _f(128, "MLP hidden width")
    num_mlp_layers: int = _f(2, "linear layers per hash MLP")
    residual: bool = _f(True, "residual connection where widths match")
    init_scale: float = _f(1e-3, "std of the MLP weight init")
    separate_query_mlp: bool = _f(False, "an extra MLP per query head for queries")
    dense_layers: tuple[int, ...] = _f((0, 1), "layers kept dense (no hash)")
    layers: tuple[int, ...] | None = _f(None, "layers to train (default: every non-dense layer)")
    # --- loss ---
    gamma: float = _f(64.0, "softsign sharpness")
    beta: float = _f(1.0, "Bradley–Terry temperature")
    margin: float = _f(0.0, "Bradley–Terry margin")
    keep_ratio: float = _f(0.02, "oracle top share")
    max_queries: int = _f(128, "sampled queries per sample per step (paper: 1024)")
    max_top: int = _f(1024, "top keys per query")
    max_other: int = _f(256, "other keys per query (paper: 1024)")
    hard_other_fraction: float = _f(
        0.0, "share of the other keys drawn from the near misses (ranks |T|..5|T|) instead of uniformly (paper: 0)"
    )
    min_query_position: int = _f(64, "queries are drawn from positions >= this")
    targets: str = _f(
        "head",
        "what is ranked: 'head' (paper: per query head by its logit) or 'group' (per KV head by the "
        "group-summed softmax, against the group-summed code similarity: what decoding selects)",
    )
    top_weight_power: float = _f(
        0.0,
        "weight each top key by its true attention ** this (mean 1 per query; 0 = uniform, the paper): puts the "
        "keys that carry attention mass, such as the attention sink, first (1: best decode perplexity on SmolLM2 "
        "with 8K-token samples)",
    )
    query_chunk: int = _f(512, "rows per chunk of the pairwise loss (memory bound)")
    # --- optimisation ---
    steps_per_layer: int = _f(120, "optimizer steps per layer")
    batch_size: int = _f(1, "samples per step")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    b1: float = _f(0.9, "AdamW beta1")
    b2: float = _f(0.98, "AdamW beta2")
    weight_decay: float = _f(0.1, "AdamW weight decay")
    warmup_ratio: float = _f(0.01, "share of steps of linear warm-up (then cosine to 0)")
    grad_clip: float = _f(1.0, "global-norm gradient clip (0 = off)")
    seed: int = _f(0, "seed of init, query/key sampling and sample order")
    # --- output ---
    out_dir: str = _f("runs/hash-smollm2-135m", "run folder: checkpoints/, metrics.jsonl, summary.json, hashes/")
    export_dir: str | None = _f(None, "where to export the final hashes (default: <out_dir>/hashes)")
    checkpoint_every: int = _f(60, "save a checkpoint every this many steps (and at the end of each layer)")
    max_to_keep: int = _f(2, "checkpoints kept")
    log_every: int = _f(10, "sync metrics / check for NaN every this many steps")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_type(f, getattr(self, f.name))
        for names, ok, phrase in _RANGES:
            for name in names:
                if not ok(getattr(self, name)):
                    raise ValueError(f"{name} must be {phrase}, got {getattr(self, name)!r}")
        if self.bits not in (32, 64, 128, 256):
            raise ValueError(f"bits must be 32, 64, 128 or 256, got {self.bits}")
        for name, allowed in (("targets", ("head", "group")), ("data_part", PARTS), ("model_dtype", _MODEL_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("dense_layers", "layers"):
            value = getattr(self, name) or ()
            if any(i < 0 for i in value) or len(set(value)) != len(value):
                raise ValueError(f"{name} must list distinct layer indices >= 0, got {getattr(self, name)!r}")
        if not self.out_dir.strip():
            raise ValueError("out_dir must name a folder, got an empty string")

    def check_model(self, model_cfg: ModelConfig) -> None:
        """Refuse layers or a sample length the model does not have (checked once the model's config is known)."""
        for name in ("dense_layers", "layers"):
            bad = [i for i in getattr(self, name) or () if i >= model_cfg.num_layers]
            if bad:
                raise ValueError(
                    f"{name} names layer(s) {bad}, but {model_cfg.name or 'the model'} has layers "
                    f"0..{model_cfg.num_layers - 1}: fix --{name.replace('_', '-')}"
                )

    def hash_config(self) -> HashConfig:
        return HashConfig(
            kind="spotlight", bits=self.bits, hidden=self.hidden, num_mlp_layers=self.num_mlp_layers,
            residual=self.residual, init_scale=self.init_scale, separate_query_mlp=self.separate_query_mlp,
        )  # fmt: skip

    def loss_config(self) -> LossConfig:
        return LossConfig(
            gamma=self.gamma, beta=self.beta, margin=self.margin, keep_ratio=self.keep_ratio,
            max_queries=self.max_queries, max_top=self.max_top, max_other=self.max_other,
            hard_other_fraction=self.hard_other_fraction, min_query_position=self.min_query_position,
            query_chunk=self.query_chunk, targets=self.targets, top_weight_power=self.top_weight_power,
        )  # fmt: skip

    @property
    def activations_path(self) -> str:
        return self.activations_dir or os.path.join(self.out_dir, "activations")

    @property
    def export_path(self) -> str:
        return self.export_dir or os.path.join(self.out_dir, "hashes")

    # Fields whose change makes a checkpoint of this run meaningless (a resume with other values is refused).
    TRAINING_FIELDS = (
        "bits", "hidden", "num_mlp_layers", "residual", "init_scale", "separate_query_mlp", "dense_layers", "layers",
        "gamma", "beta", "margin", "keep_ratio", "max_queries", "max_top", "max_other", "hard_other_fraction",
        "min_query_position", "targets", "top_weight_power",
        "steps_per_layer", "batch_size", "lr", "b1", "b2", "weight_decay", "warmup_ratio", "grad_clip", "seed",
    )  # fmt: skip

    @classmethod
    def from_json(cls, path: str, **overrides: Any) -> TrainConfig:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config file at {path} (the shipped ones are in configs/)")
        raw = read_json(path, ValueError, f"no config file at {path}")
        raw = {k: v for k, v in raw.items() if not k.startswith("_")}  # "_comment" keys
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown keys in {path}: {sorted(unknown)}")
        try:
            return cls(**_coerce({**raw, **overrides}))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


def _coerce(d: dict[str, Any]) -> dict[str, Any]:
    out = dict(d)
    for k in ("dense_layers", "layers"):
        if isinstance(out.get(k), list):  # JSON has no tuples
            out[k] = tuple(out[k])
    return out


_MODEL_DTYPES = ("float32", "bfloat16", "float16")
_POSITIVE = (
    "num_samples", "collect_batch_size", "hidden", "num_mlp_layers", "max_queries", "max_top", "max_other",
    "query_chunk", "steps_per_layer", "batch_size", "checkpoint_every", "max_to_keep", "log_every",
)  # fmt: skip
# (fields, test, what the test asks) for TrainConfig's numeric fields; a value outside them would fail later, deep in
# a jit trace, or train silently wrong (keep_ratio 0 keeps no key, a NaN lr never moves).
_RANGES: tuple[tuple[tuple[str, ...], Callable[[Any], bool], str], ...] = (
    (_POSITIVE, lambda v: v >= 1, "an integer >= 1"),
    (("seq_len",), lambda v: v >= 2, "an integer >= 2"),
    (("min_query_position", "seed"), lambda v: v >= 0, "an integer >= 0"),
    (("keep_ratio",), lambda v: 0 < v <= 1, "in (0, 1]"),
    (("heldout_fraction",), lambda v: 0 < v < 1, "in (0, 1)"),
    (("hard_other_fraction",), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("warmup_ratio", "b1", "b2"), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("lr", "gamma", "beta"), lambda v: v > 0, "> 0"),
    (("weight_decay", "grad_clip", "top_weight_power", "init_scale"), lambda v: v >= 0, ">= 0"),
)


def _check_type(f: dataclasses.Field, value: Any) -> None:
    """The field's annotated type (a string here: `from __future__ import annotations`); floats must be finite."""
    kind = f.type.removesuffix(" | None")
    if value is None and kind != f.type:
        return
    if kind == "tuple[int, ...]":
        ok = isinstance(value, tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    elif kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    else:
        want = {"int": int, "bool": bool, "str": str}[kind]
        ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
    if not ok:
        shown = "a finite number" if kind == "float" else kind
        raise ValueError(f"{f.name} must be {shown}, got {value!r} ({type(value).__name__})")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the layer and step. Checkpoints before it are intact."""


@dataclasses.dataclass
class TrainResult:
    stack: HashStack
    export_path: str
    summary: dict[str, Any]


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return _optimizer(cfg.steps_per_layer, cfg.warmup_ratio, cfg.lr, cfg.b1, cfg.b2, cfg.weight_decay, cfg.grad_clip)


@functools.cache
def _optimizer(steps, warmup_ratio, lr, b1, b2, weight_decay, grad_clip) -> optax.GradientTransformation:
    # Cached: `tx` is a static argument of the jitted step, so equal settings must give the same object, or every
    # train() call in one process (a resume, a test) compiles the step again.
    warmup = max(1, round(warmup_ratio * steps)) if warmup_ratio > 0 else 0
    if warmup:
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=0.0)
    else:
        schedule = optax.cosine_decay_schedule(lr, steps)
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.chain(*parts)


def _train_step(graphdef, params, opt_state, q, k, key, *, tx, loss_cfg: LossConfig):
    """One AdamW step of one layer's hash. q: [B, N, T, H], k: [B, K, T, H] (bf16 / fp32)."""

    def loss_fn(p):
        return bradley_terry_loss(nnx.merge(graphdef, p), q, k, key, loss_cfg)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}


@functools.cache
def _jitted_train_step():
    # Donating params / optimizer state saves a copy on accelerators; the CPU backend would only warn about it.
    donate = (1, 2) if jax.default_backend() != "cpu" else ()
    return jax.jit(_train_step, static_argnames=("graphdef", "tx", "loss_cfg"), donate_argnums=donate)


def train_step(graphdef, params, opt_state, q, k, key, *, tx, loss_cfg: LossConfig):
    """Jitted `_train_step` (compiled once per graph/shape; all layers of a stack share the compilation)."""
    return _jitted_train_step()(graphdef, params, opt_state, q, k, key, tx=tx, loss_cfg=loss_cfg)


def step_batch(cfg: TrainConfig, layer: int, step: int, num_samples: int) -> tuple[np.ndarray, jax.Array]:
    """Sample indices and PRNG key of (layer, step): pure functions of the seed, so a resumed run repeats them."""
    rng = np.random.default_rng([cfg.seed, layer, step])
    idx = rng.choice(num_samples, cfg.batch_size, replace=cfg.batch_size > num_samples)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), layer), step)
    return idx, key


RUN_CONFIG = "run_config.json"
LOCK_FILE = "train.lock"
CHECKPOINTS = "checkpoints"
DAMAGED_CHECKPOINTS = "damaged_checkpoints"


class CheckpointWarning(UserWarning):
    """A training checkpoint was skipped (damaged, or not restorable) or restored without checksums."""


def _provenance(acts) -> dict[str, Any]:
    """What the activations a run trains on were made from (recorded in run_config.json and in the export)."""
    m = getattr(acts, "manifest", None) or {}
    return json.loads(json.dumps({
        "model_source": m.get("model_source"),
        "model_name": m.get("model_name"),
        "model_weights_sha256": m.get("model_weights_sha256"),
        "data": m.get("data") or None,
        "seq_len": int(acts.seq_len),
        "num_samples": int(acts.num_samples),
        "tokens_sha256": m.get("tokens_sha256"),
    }))  # fmt: skip


def _request_diff(prov: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Where `cfg`'s model and data request differs from what `prov` (a cache manifest's or a run's provenance) was
    made from, told without loading the model or the data: {field: (recorded, asked)}."""
    from spotlight_jax.convert import describe_source

    want = describe_source(cfg.model)
    wrong: dict[str, tuple[Any, Any]] = {}
    if prov.get("model_source"):
        if not _acts.same_source(prov["model_source"], want):
            wrong["model"] = (prov["model_source"].get("model"), want["model"])
    elif cfg.model is not None and prov.get("model_name") and prov["model_name"] != want["name"]:
        # A cache that records no source (made by collect_activations itself, or before sources were recorded):
        # without --model its own model is the one meant; with one, at least the names must agree.
        wrong["model"] = (prov["model_name"], want["name"])
    expect = {"seq_len": (prov.get("seq_len"), cfg.seq_len), "num_samples": (prov.get("num_samples"), cfg.num_samples)}
    data = prov.get("data") or {}
    if data.get("token_file"):  # made from a pre-tokenised .npz: its own description names the corpus, not the file
        expect["dataset"] = (data["token_file"], os.path.basename(str(cfg.dataset)))
    elif data:  # caches made by collect_activations without a data description skip these checks
        expect["dataset"] = (data.get("source"), cfg.dataset)
        expect["data_part"] = (data.get("part"), cfg.data_part)
    wrong.update({k: v for k, v in expect.items() if v[0] != v[1]})
    return wrong


def _detail(wrong: dict[str, tuple[Any, Any]], before: str, now: str) -> str:
    return ", ".join(f"{k}: {before} {a!r} vs {now} {b!r}" for k, (a, b) in wrong.items())


def _reusable_activations(path: str, cfg: TrainConfig) -> bool:
    """True when `path` holds a complete cache made with cfg's model and data; raises when it holds another one."""
    if not os.path.exists(os.path.join(path, "manifest.json")):
        return False
    m = read_manifest(path)
    wrong = _request_diff(m, cfg)  # a manifest has the fields of a provenance record
    if wrong:
        raise ActivationCacheError(
            f"the activation cache {path} does not match this run ({_detail(wrong, 'cache', 'asked')}); pass the "
            "matching flags, another --activations-dir, or delete it"
        )
    return m.get("completed") == m.get("num_samples")


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def prepare_activations(cfg: TrainConfig, model=None, tokenizer=None, progress: bool = True) -> ActivationReader:
    """Reuse `cfg.activations_path` when complete, else load the model, build samples and collect (resumably).

    A `model` passed in stands for `cfg.model` (already loaded): the cache records `cfg.model` as its source and
    the passed model's weights fingerprint. A cache made from another model or other data is refused.
    """
    from spotlight_jax.convert import describe_source

    path = check_folder_path(cfg.activations_path, "the activations folder")
    if _reusable_activations(path, cfg):
        reader = ActivationReader(path)
        recorded = reader.manifest.get("model_weights_sha256")
        given = _acts.weights_fingerprint(model) if model is not None and recorded else recorded
        if given != recorded:
            raise ActivationCacheError(
                f"the activation cache {path} was made from other weights than the model passed in (weights "
                f"fingerprint {recorded} vs {given}): use another --activations-dir or delete it"
            )
        return reader
    from spotlight_jax import data

    if model is None:
        from spotlight_jax.convert import load_model

        _say(progress, f"loading model {cfg.model or 'SmolLM2-135M-Instruct (embedded)'} ...")
        model, tokenizer = load_model(cfg.model, dtype=jnp.dtype(cfg.model_dtype), allow_download=cfg.allow_download)
    cfg.check_model(model.cfg)
    if cfg.seq_len > model.cfg.max_position_embeddings:
        raise ValueError(
            f"seq_len {cfg.seq_len} exceeds the {model.cfg.max_position_embeddings} positions of "
            f"{model.cfg.name or 'the model'}: lower --seq-len"
        )
    if tokenizer is None and not str(cfg.dataset).endswith(".npz"):  # a token file needs no tokenizer
        raise ValueError("collecting activations needs a tokenizer (load_model returned none)")
    _say(progress, f"tokenising {cfg.num_samples} samples of {cfg.seq_len} tokens from {cfg.dataset} ({cfg.data_part})")
    samples, info = data.build_samples(
        tokenizer, cfg.dataset, seq_len=cfg.seq_len, num_samples=cfg.num_samples, part=cfg.data_part,
        heldout_fraction=cfg.heldout_fraction, seed=cfg.seed, text_field=cfg.text_field,
        allow_download=cfg.allow_download, eos_id=(model.cfg.eos_token_ids or (None,))[0],
    )  # fmt: skip
    layers = cfg.layers or non_dense_layers(model.cfg.num_layers, cfg.dense_layers)
    return collect_activations(
        model, samples, path, layers, batch_size=cfg.collect_batch_size, data_info=info,
        source=describe_source(cfg.model), progress=progress,
    )  # fmt: skip


def _read_run_config(out_dir: str) -> dict[str, Any] | None:
    path = os.path.join(out_dir, RUN_CONFIG)
    if not os.path.exists(path):
        return None
    run = read_json(path, ValueError, "")
    if not isinstance(run.get("training", {}), dict) or not isinstance(run.get("provenance") or {}, dict):
        raise ValueError(f"corrupt {path}: 'training' / 'provenance' are not JSON objects")
    return run


def _corrupt_run_config(out_dir: str, e: ValueError) -> ValueError:
    return ValueError(f"{e}: {out_dir} cannot be resumed safely without it; restore the file, or use another --out-dir")


def _check_request(out_dir: str, cfg: TrainConfig) -> None:
    """Before any model or data work: refuse to resume a run made from another model or other data."""
    try:
        run = _read_run_config(out_dir)
    except ValueError as e:
        raise _corrupt_run_config(out_dir, e) from e
    wrong = _request_diff(run["provenance"], cfg) if run and run.get("provenance") else {}
    if wrong:
        raise ValueError(
            f"{out_dir} holds a run trained on other activations ({_detail(wrong, 'run', 'asked')}); pass the "
            "matching --model / --dataset / sample flags, or use another --out-dir"
        )


def _provenance_diff(before: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (recorded, now)} where two provenances differ in what the training sees: the weights or the tokens
    (their fingerprints), else the model name and sample counts (synthetic activations have no fingerprints)."""
    keys = ("model_weights_sha256", "tokens_sha256", "seq_len", "num_samples")
    if not (before.get("model_weights_sha256") or now.get("model_weights_sha256")):
        keys += ("model_name",)
    wrong = {k: (before.get(k), now.get(k)) for k in keys if before.get(k) != now.get(k)}
    if wrong:  # name the differences a user can act on first
        if not _acts.same_source(before.get("model_source"), now.get("model_source")):
            wrong = {"model": ((before.get("model_source") or {}).get("model"),
                               (now.get("model_source") or {}).get("model")), **wrong}  # fmt: skip
        a, b = before.get("data") or {}, now.get("data") or {}
        for k in ("source", "token_file", "part"):
            if a.get(k) != b.get(k):
                wrong[f"data {k}"] = (a.get(k), b.get(k))
    return wrong


def _check_run_config(out_dir: str, cfg: TrainConfig, provenance: dict[str, Any]) -> None:
    """Refuse to resume a run made with different training settings or on other activations (its checkpoints
    would be mixed in); record both for the next resume."""
    path = os.path.join(out_dir, RUN_CONFIG)
    now = {k: getattr(cfg, k) for k in TrainConfig.TRAINING_FIELDS}
    now = json.loads(json.dumps(now))
    try:
        run = _read_run_config(out_dir)
    except ValueError as e:
        raise _corrupt_run_config(out_dir, e) from e
    if run is not None:
        before = run.get("training", {})
        # A field added after the run was made counts as its default, the value such runs trained with
        # (hard_other_fraction, targets, top_weight_power): keep it so if a default ever changes.
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        diff = {k: (before.get(k, defaults[k]), v) for k, v in now.items() if before.get(k, defaults[k]) != v}
        if diff:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"{out_dir} holds a run with other training settings ({detail}); use another --out-dir or delete it"
            )
        # Runs recorded before provenance existed are resumed as before (and recorded from now on).
        wrong = _provenance_diff(run["provenance"], provenance) if run.get("provenance") else {}
        if wrong:
            raise ValueError(
                f"{out_dir} holds a run trained on other activations ({_detail(wrong, 'run', 'now')}): its "
                "checkpoints would be mixed with these; use the original model / data / --activations-dir, or "
                "another --out-dir"
            )
    full = json.loads(json.dumps(dataclasses.asdict(cfg)))
    write_json_atomic(path, {"training": now, "full": full, "provenance": provenance})


def _first_non_finite(tree: Any) -> str | None:
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        arr = np.asarray(x)
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            return jax.tree_util.keystr(path)
    return None


def _restore_newest_intact(ckpt_dir: str, out_dir: str, options, abstract) -> tuple[Any, dict | None]:
    """(CheckpointManager, restored state of the newest intact step or None). A step whose checksums do not match,
    that orbax cannot read or that holds NaN / inf is moved to <out_dir>/damaged_checkpoints/ (nothing is deleted)
    with a warning, and the step before it is tried."""
    import orbax.checkpoint as ocp

    while True:
        mngr = ocp.CheckpointManager(ckpt_dir, options=options)
        step = mngr.latest_step()
        if step is None:
            return mngr, None
        step_dir = os.path.join(ckpt_dir, str(step))
        try:
            problem, verified = verify_sums(step_dir), True
        except FileNotFoundError:  # saved before checksums existed, or killed between orbax's commit and them
            problem, verified = None, False
        restored = None
        if problem is None:
            try:
                restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
            except Exception as e:  # orbax / tensorstore raise many types for a damaged step
                problem = f"orbax cannot read it: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        if problem is None:
            bad = _first_non_finite(restored)
            if bad is None:
                if not verified:
                    warnings.warn(
                        f"checkpoint step {step} in {ckpt_dir} has no checksum file; restored it unverified (its "
                        "values are finite and orbax read it whole)",
                        CheckpointWarning,
                        stacklevel=3,
                    )
                return mngr, restored
            problem = f"{bad} holds NaN or inf"
        mngr.close()
        aside = os.path.join(out_dir, DAMAGED_CHECKPOINTS, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        os.rename(step_dir, aside)
        warnings.warn(
            f"checkpoint step {step} in {ckpt_dir} is damaged ({problem}); moved it to {aside} and trying the "
            "previous one",
            CheckpointWarning,
            stacklevel=3,
        )


def train(
    cfg: TrainConfig = TrainConfig(),
    *,
    activations=None,
    model=None,
    tokenizer=None,
    on_step: Callable[[int, int, dict[str, float] | None], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or resume) every requested layer's hash and export them.

    activations: an `ActivationReader` / `ArrayActivations`; default: prepared from `cfg` (collecting if needed).
    on_step(layer, step, _): called after each step is dispatched (tests use it to interrupt a run).
    The run folder is locked for the call: a second run in the same folder is refused (docs/guarantees.md).
    """
    out_dir = check_folder_path(cfg.out_dir, "the run folder (out_dir)")
    export = check_folder_path(cfg.export_path, "the export folder")
    if os.path.isdir(export) and os.listdir(export) and not is_hash_export(export):
        # Checked now, not after hours of training: the export would refuse to replace this folder.
        raise ValueError(f"the export folder {export} holds other files (not a hash export): pass another --export-dir")
    with dir_lock(out_dir, LOCK_FILE, "training run"):
        if activations is None:
            _check_request(out_dir, cfg)
        acts = activations if activations is not None else prepare_activations(cfg, model, tokenizer, progress)
        return _train_locked(cfg, out_dir, acts, on_step, progress)


def _train_locked(cfg: TrainConfig, out_dir: str, acts, on_step, progress: bool) -> TrainResult:
    import orbax.checkpoint as ocp

    model_cfg = acts.model_cfg
    cfg.check_model(model_cfg)
    layers = cfg.layers or non_dense_layers(model_cfg.num_layers, cfg.dense_layers)
    missing = [i for i in layers if i not in acts.layers]
    if missing:
        raise ValueError(f"layers {missing} are not in the activation cache (it has {acts.layers})")
    if acts.seq_len <= cfg.min_query_position:
        raise ValueError(f"seq_len {acts.seq_len} <= min_query_position {cfg.min_query_position}")
    if acts.seq_len > model_cfg.max_position_embeddings:
        raise ValueError(
            f"the activations hold {acts.seq_len}-token samples, more than the model's "
            f"{model_cfg.max_position_embeddings} positions: collect them again with a smaller --seq-len"
        )

    provenance = _provenance(acts)
    _check_run_config(out_dir, cfg, provenance)
    stack = HashStack(model_cfg, cfg.hash_config(), layers=layers, rngs=nnx.Rngs(cfg.seed))
    tx, loss_cfg = make_optimizer(cfg), cfg.loss_config()
    graphdef, _ = nnx.split(stack.for_layer(layers[0]))  # every layer's module has the same graph -> one compile

    def fresh_opt_state(layer):
        return tx.init(nnx.state(stack.for_layer(layer)))

    steps = cfg.steps_per_layer
    ckpt_dir = os.path.join(out_dir, CHECKPOINTS)
    # cleanup_tmp_directories: a save killed mid-write leaves orbax's temporary folder, removed at the next start.
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.max_to_keep, create=True, cleanup_tmp_directories=True)
    abstract = {
        "hashes": jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(stack)),
        "opt_state": jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh_opt_state(layers[0])),
        "progress": jax.ShapeDtypeStruct((2,), jnp.int32),
    }
    mngr, restored = _restore_newest_intact(ckpt_dir, out_dir, options, abstract)
    start_layer, start_step, opt_state = 0, 0, None
    if restored is not None:
        nnx.update(stack, restored["hashes"])
        start_layer, start_step = (int(x) for x in restored["progress"])
        opt_state = restored["opt_state"] if start_step > 0 else None
        if progress:
            print(f"resuming {out_dir}: layer #{start_layer} step {start_step}", file=sys.stderr)

    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    summary_path = os.path.join(out_dir, "summary.json")
    done_global = start_layer * steps + start_step
    _truncate_metrics(metrics_path, done_global)
    summary = _read_json(summary_path) if done_global else {}
    summary = {k: v for k, v in summary.items() if k.startswith("layer_") and v.get("global_step", 0) <= done_global}

    def save(layer_pos: int, step: int, opt_state) -> None:
        state = {
            "hashes": nnx.state(stack),
            "opt_state": opt_state,
            "progress": jnp.asarray([layer_pos, step], jnp.int32),
        }
        n = layer_pos * steps + step
        with disk_guard(f"saving checkpoint step {n} in {ckpt_dir} (the earlier checkpoints are intact)"):
            mngr.save(n, args=ocp.args.StandardSave(state), force=True)
            mngr.wait_until_finished()
            write_sums(os.path.join(ckpt_dir, str(n)))  # checked at the next resume (_restore_newest_intact)

    try:
        for lp in range(start_layer, len(layers)):
            layer = layers[lp]
            module = stack.for_layer(layer)
            params = nnx.state(module)
            if opt_state is None:
                opt_state = fresh_opt_state(layer)
            s0 = start_step if lp == start_layer else 0
            pending: list[tuple[int, dict]] = []
            history: list[dict] = _layer_rows(metrics_path, layer) if s0 else []
            t0 = time.time()
            bar = tqdm(total=steps, initial=s0, desc=f"layer {layer:>3} ({lp + 1}/{len(layers)})", disable=not progress)

            def flush(bar=bar, layer=layer, lp=lp, pending=pending, history=history):
                """Sync pending metrics, stop on NaN/inf (before anything is checkpointed), log them."""
                if not pending:
                    return
                host = jax.device_get([m for _, m in pending])
                rows = []
                for (s, _), m in zip(pending, host, strict=True):
                    if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
                        raise NonFiniteLossError(
                            f"non-finite loss ({m['loss']}) / grad norm ({m['grad_norm']}) at layer {layer}, step "
                            f"{s}: training stopped; checkpoints up to the last save are kept in {out_dir}/checkpoints"
                        )
                    row = {"layer": layer, "step": s, "global_step": lp * steps + s + 1}
                    rows.append({**row, **{k: float(v) for k, v in m.items()}})
                # A torn last line (a kill or a full disk mid-write) is dropped at the next resume.
                with disk_guard(f"appending to {metrics_path}"), open(metrics_path, "a") as f:
                    for r in rows:
                        f.write(json.dumps(r) + "\n")
                history.extend(rows)
                pending.clear()
                last = rows[-1]
                bar.set_postfix(loss=f"{last['loss']:.4f}", rank_err=f"{last['ranking_error']:.4f}")

            for s in range(s0, steps):
                idx, key = step_batch(cfg, layer, s, acts.num_samples)
                q, k = acts.get(layer, idx)
                params, opt_state, m = train_step(
                    graphdef, params, opt_state, jnp.asarray(q), jnp.asarray(k), key, tx=tx, loss_cfg=loss_cfg
                )
                pending.append((s, m))
                bar.update(1)
                if (s + 1) % cfg.log_every == 0 or s + 1 == steps:
                    flush()
                if (s + 1) % cfg.checkpoint_every == 0 and s + 1 < steps:
                    flush()
                    nnx.update(module, params)
                    save(lp, s + 1, opt_state)
                if on_step is not None:
                    on_step(layer, s, None)
            flush()
            bar.close()
            nnx.update(module, params)
            tail = history[-max(1, len(history) // 10) :] or [{}]
            summary[f"layer_{layer:03d}"] = {
                "layer": layer,
                "steps": steps,
                "final_loss": float(np.mean([r.get("loss", np.nan) for r in tail])),
                "final_ranking_error": float(np.mean([r.get("ranking_error", np.nan) for r in tail])),
                "first_loss": history[0]["loss"] if history and s0 == 0 else None,
                "seconds": round(time.time() - t0, 2),
                "global_step": (lp + 1) * steps,
            }
            _write_json(summary_path, summary)
            opt_state = None
            save(lp + 1, 0, fresh_opt_state(layer))
    except KeyboardInterrupt:
        mngr.wait_until_finished()
        mngr.close()
        raise
    mngr.close()

    meta = {
        "training_data": getattr(acts, "manifest", {}).get("data", {}),
        "activations": getattr(acts, "out_dir", None),
        "activation_samples": acts.num_samples,
        "seq_len": acts.seq_len,
        "steps_per_layer": steps,
        "provenance": provenance,
        "train_config": json.loads(json.dumps(dataclasses.asdict(cfg))),
        "per_layer": {k: {kk: v[kk] for kk in ("final_loss", "final_ranking_error")} for k, v in summary.items()},
    }
    path = export_hashes(cfg.export_path, stack, meta)
    return TrainResult(stack, path, summary)


def _jsonl_rows(path: str) -> list[dict]:
    """The rows of a metrics file; a line that does not parse (torn by a kill or a full disk) is skipped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _truncate_metrics(path: str, done_global: int) -> None:
    """Drop metric rows past the resumed checkpoint (they will be recomputed identically)."""
    if not os.path.exists(path):
        return
    if done_global == 0:
        os.remove(path)
        return
    keep = [r for r in _jsonl_rows(path) if r.get("global_step", 0) <= done_global]
    tmp = f"{path}.tmp-{os.getpid()}"
    with disk_guard(f"rewriting {path}", lambda: os.path.exists(tmp) and os.remove(tmp)):
        with open(tmp, "w") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)


def _layer_rows(path: str, layer: int) -> list[dict]:
    return [r for r in _jsonl_rows(path) if r.get("layer") == layer]


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        return read_json(path, ValueError, "")
    except ValueError as e:
        raise ValueError(f"{e}: delete it and run again (it only summarises the finished layers)") from e


def _write_json(path: str, obj: Any) -> None:
    write_json_atomic(path, obj)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


# Options whose command-line spelling is shared with the other tools (`--data`, `--batch`), hidden deprecated
# spellings, and the closed sets of values; every other field is `--<field-name>`.
CLI_OPTIONS: dict[str, dict[str, Any]] = {
    "model": {
        "help": "model to collect activations from: a folder, .gguf file or hub id (default: the embedded "
        "SmolLM2-135M-Instruct)"
    },
    "dataset": {"flag": "data", "aliases": ("dataset",)},
    "batch_size": {"flag": "batch", "aliases": ("batch-size",)},
    "model_dtype": {"choices": _MODEL_DTYPES},
    "data_part": {"choices": PARTS},
    "bits": {"choices": (32, 64, 128, 256)},
    "targets": {"choices": ("head", "group")},
    "dense_layers": {"type": int, "nargs": "*"},
    "layers": {"type": int, "nargs": "+"},
}
EXAMPLES = """examples:
  spotlight-train                                          # SmolLM2-135M on the stdlib corpus, CPU, ~12 min
  spotlight-train --config configs/qwen2.5-7b.json --model /path/to/Qwen2.5-7B --data corpus.jsonl
  spotlight-train --steps-per-layer 50 --bits 64 --dense-layers 0 1 2 --out-dir runs/h64
"""


def _value_parser(field: dataclasses.Field) -> Callable[[str], Any]:
    """argparse `type` of a scalar field: its default's type; 'none' -> None where None is the default."""
    kind = type(field.default) if field.default is not None else str

    def parse(text: str) -> Any:
        return None if field.default is None and text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


def build_parser() -> argparse.ArgumentParser:
    from spotlight_jax import cli

    p = argparse.ArgumentParser(
        prog="spotlight-train",
        description=(
            "Train Spotlight Attention hash functions layer by layer on cached activations of a frozen LLM.\n"
            "Settings come from --config (default: the built-in defaults, identical to configs/smollm2-135m.json:\n"
            "SmolLM2-135M on the offline stdlib corpus, sized for a CPU); any option below overrides one field.\n"
            "A run folder is resumed when it exists (same training settings required)."
        ),
        epilog=EXAMPLES,
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields (e.g. configs/qwen2.5-7b.json)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    cli.add_debug_arg(p)
    overrides = {}
    for f in dataclasses.fields(TrainConfig):
        extra = CLI_OPTIONS.get(f.name, {})
        is_scalar = not isinstance(f.default, bool | tuple) and "nargs" not in extra
        overrides[f.name] = {**({"type": _value_parser(f)} if is_scalar else {}), **extra}
    cli.add_config_args(p, TrainConfig, suppress_defaults=True, overrides=overrides)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in fields}
    if args.config:
        return TrainConfig.from_json(args.config, **overrides)
    return TrainConfig(**overrides)


def main(argv: list[str] | None = None) -> int:
    from spotlight_jax.cli import run_cli

    args = build_parser().parse_args(argv)
    return run_cli(lambda: _main(args), debug=args.debug)


def _main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    t0 = time.time()
    result = train(cfg, progress=args.progress)
    layers = sorted(result.summary.values(), key=lambda r: r["layer"])
    print(f"\n{'layer':>5}  {'loss':>8}  {'rank err':>8}  {'sec':>6}")
    for r in layers:
        print(f"{r['layer']:>5}  {r['final_loss']:>8.4f}  {r['final_ranking_error']:>8.4f}  {r['seconds']:>6.1f}")
    if layers:
        print(f"{'mean':>5}  {np.mean([r['final_loss'] for r in layers]):>8.4f}  "
              f"{np.mean([r['final_ranking_error'] for r in layers]):>8.4f}")  # fmt: skip
    print(f"exported hashes to {result.export_path}  ({time.time() - t0:.0f} s total)")
    print(
        "\nloss: the final Bradley-Terry ranking loss of each layer's hash; rank err: the share of (top key, other key)"
        " pairs its codes order wrongly (0 = perfect, 0.5 = chance).\nNext:\n"
        f"  python -m spotlight_jax.eval recall --hashes spotlight={result.export_path}"
        "   # recall of the selected tokens on held-out documents\n"
        f"  python -m spotlight_jax.eval perplexity --hashes {result.export_path}"
        "   # decode-path perplexity: dense, oracle, linear, spotlight"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
