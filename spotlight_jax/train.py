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
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from spotlight_jax.activations import ActivationCacheError, ActivationReader, collect_activations, read_manifest
from spotlight_jax.hashing import HashConfig, HashStack, export_hashes, non_dense_layers
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
        if self.bits not in (32, 64, 128, 256):
            raise ValueError(f"bits must be 32, 64, 128 or 256, got {self.bits}")
        if self.steps_per_layer < 1 or self.batch_size < 1 or self.num_samples < 1:
            raise ValueError("steps_per_layer, batch_size and num_samples must be >= 1")
        if self.targets not in ("head", "group"):
            raise ValueError(f"targets must be 'head' or 'group', got {self.targets!r}")

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
        with open(path) as f:
            raw = json.load(f)
        raw = {k: v for k, v in raw.items() if not k.startswith("_")}  # "_comment" keys
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown keys in {path}: {sorted(unknown)}")
        return cls(**_coerce({**raw, **overrides}))


def _coerce(d: dict[str, Any]) -> dict[str, Any]:
    out = dict(d)
    for k in ("dense_layers", "layers"):
        if out.get(k) is not None:
            out[k] = tuple(int(x) for x in out[k])
    return out


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the layer and step. Checkpoints before it are intact."""


@dataclasses.dataclass
class TrainResult:
    stack: HashStack
    export_path: str
    summary: dict[str, Any]


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    steps = cfg.steps_per_layer
    warmup = max(1, round(cfg.warmup_ratio * steps)) if cfg.warmup_ratio > 0 else 0
    if warmup:
        schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(steps, warmup + 1), end_value=0.0)
    else:
        schedule = optax.cosine_decay_schedule(cfg.lr, steps)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
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


def _reusable_activations(path: str, cfg: TrainConfig) -> bool:
    """True when `path` holds a complete cache made with cfg's data settings; raises when it holds another one."""
    if not os.path.exists(os.path.join(path, "manifest.json")):
        return False
    m = read_manifest(path)
    data = m.get("data") or {}
    expect = {"seq_len": (m.get("seq_len"), cfg.seq_len), "num_samples": (m.get("num_samples"), cfg.num_samples)}
    if data.get("token_file"):  # made from a pre-tokenised .npz: its own description names the corpus, not the file
        expect["dataset"] = (data["token_file"], os.path.basename(str(cfg.dataset)))
    elif data:  # caches made by collect_activations without a data description skip these checks
        expect["dataset"] = (data.get("source"), cfg.dataset)
        expect["data_part"] = (data.get("part"), cfg.data_part)
    wrong = {k: v for k, v in expect.items() if v[0] != v[1]}
    if wrong:
        detail = ", ".join(f"{k}: cache {a!r} vs asked {b!r}" for k, (a, b) in wrong.items())
        raise ActivationCacheError(
            f"the activation cache {path} does not match this run ({detail}); pass the matching flags, another "
            "--activations-dir, or delete it"
        )
    return m.get("completed") == m.get("num_samples")


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def prepare_activations(cfg: TrainConfig, model=None, tokenizer=None, progress: bool = True) -> ActivationReader:
    """Reuse `cfg.activations_path` when complete, else load the model, build samples and collect (resumably)."""
    path = cfg.activations_path
    if _reusable_activations(path, cfg):
        return ActivationReader(path)
    from spotlight_jax import data

    if model is None:
        from spotlight_jax.convert import load_model

        _say(progress, f"loading model {cfg.model or 'SmolLM2-135M-Instruct (embedded)'} ...")
        model, tokenizer = load_model(cfg.model, dtype=jnp.dtype(cfg.model_dtype), allow_download=cfg.allow_download)
        _say(
            progress,
            f"tokenising {cfg.num_samples} samples of {cfg.seq_len} tokens from {cfg.dataset} ({cfg.data_part})",
        )
    if tokenizer is None:
        raise ValueError("collecting activations needs a tokenizer (load_model returned none)")
    samples, info = data.build_samples(
        tokenizer, cfg.dataset, seq_len=cfg.seq_len, num_samples=cfg.num_samples, part=cfg.data_part,
        heldout_fraction=cfg.heldout_fraction, seed=cfg.seed, text_field=cfg.text_field,
        allow_download=cfg.allow_download, eos_id=(model.cfg.eos_token_ids or (None,))[0],
    )  # fmt: skip
    layers = cfg.layers or non_dense_layers(model.cfg.num_layers, cfg.dense_layers)
    return collect_activations(
        model, samples, path, layers, batch_size=cfg.collect_batch_size, data_info=info, progress=progress
    )


def _check_run_config(out_dir: str, cfg: TrainConfig) -> None:
    """Refuse to resume a run made with different training settings (its checkpoints would be mixed in)."""
    path = os.path.join(out_dir, "run_config.json")
    now = {k: getattr(cfg, k) for k in TrainConfig.TRAINING_FIELDS}
    now = json.loads(json.dumps(now))
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f).get("training", {})
        # A field added after the run was made counts as its default, the value such runs trained with
        # (hard_other_fraction, targets, top_weight_power): keep it so if a default ever changes.
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        diff = {k: (before.get(k, defaults[k]), v) for k, v in now.items() if before.get(k, defaults[k]) != v}
        if diff:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"{out_dir} holds a run with other training settings ({detail}); use another --out-dir or delete it"
            )
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"training": now, "full": json.loads(json.dumps(dataclasses.asdict(cfg)))}, f, indent=2)


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
    """
    import orbax.checkpoint as ocp

    acts = activations if activations is not None else prepare_activations(cfg, model, tokenizer, progress)
    model_cfg = acts.model_cfg
    layers = cfg.layers or non_dense_layers(model_cfg.num_layers, cfg.dense_layers)
    missing = [i for i in layers if i not in acts.layers]
    if missing:
        raise ValueError(f"layers {missing} are not in the activation cache (it has {acts.layers})")
    if acts.seq_len <= cfg.min_query_position:
        raise ValueError(f"seq_len {acts.seq_len} <= min_query_position {cfg.min_query_position}")

    out_dir = os.path.abspath(cfg.out_dir)
    _check_run_config(out_dir, cfg)
    stack = HashStack(model_cfg, cfg.hash_config(), layers=layers, rngs=nnx.Rngs(cfg.seed))
    tx, loss_cfg = make_optimizer(cfg), cfg.loss_config()
    graphdef, _ = nnx.split(stack.for_layer(layers[0]))  # every layer's module has the same graph -> one compile

    def fresh_opt_state(layer):
        return tx.init(nnx.state(stack.for_layer(layer)))

    steps = cfg.steps_per_layer
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.max_to_keep, create=True)
    mngr = ocp.CheckpointManager(os.path.join(out_dir, "checkpoints"), options=options)
    start_layer, start_step, opt_state = 0, 0, None
    if mngr.latest_step() is not None:
        abstract = {
            "hashes": jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(stack)),
            "opt_state": jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh_opt_state(layers[0])),
            "progress": jax.ShapeDtypeStruct((2,), jnp.int32),
        }
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract))
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
        mngr.save(layer_pos * steps + step, args=ocp.args.StandardSave(state), force=True)
        mngr.wait_until_finished()

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
                with open(metrics_path, "a") as f:
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
        "train_config": json.loads(json.dumps(dataclasses.asdict(cfg))),
        "per_layer": {k: {kk: v[kk] for kk in ("final_loss", "final_ranking_error")} for k, v in summary.items()},
    }
    path = export_hashes(cfg.export_path, stack, meta)
    return TrainResult(stack, path, summary)


def _truncate_metrics(path: str, done_global: int) -> None:
    """Drop metric rows past the resumed checkpoint (they will be recomputed identically)."""
    if not os.path.exists(path):
        return
    if done_global == 0:
        os.remove(path)
        return
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keep = [r for r in rows if r.get("global_step", 0) <= done_global]
    with open(path, "w") as f:
        for r in keep:
            f.write(json.dumps(r) + "\n")


def _layer_rows(path: str, layer: int) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in (json.loads(line) for line in f if line.strip()) if r.get("layer") == layer]


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def _parse_value(field: dataclasses.Field, text: str) -> Any:
    if text.lower() in ("none", "null") and field.default is None:
        return None
    if field.name in ("dense_layers", "layers"):
        return tuple(int(x) for x in text.replace(",", " ").split()) if text.strip() else ()
    t = type(field.default) if field.default is not None else str
    if t is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"--{field.name.replace('_', '-')} expects true/false, got {text!r}")
    return t(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spotlight_jax.train",
        description=(
            "Train Spotlight Attention hash functions layer by layer on cached activations of a frozen LLM.\n"
            "Settings come from --config (default: the built-in defaults, identical to configs/smollm2-135m.json: "
            "SmolLM2-135M on the offline stdlib corpus, sized for <= 20 min on a CPU); any flag below overrides one "
            "field. A run folder is resumed when it exists (same training settings required)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields (e.g. configs/qwen2.5-7b.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    for f in dataclasses.fields(TrainConfig):
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=argparse.SUPPRESS,
            metavar=f.name.upper() if f.name not in ("dense_layers", "layers") else "I,J,..",
            help=f"{f.metadata.get('help', '')} [default: {f.default}]",
        )
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    overrides = {k: _parse_value(fields[k], v) for k, v in vars(args).items() if k in fields}
    if args.config:
        return TrainConfig.from_json(args.config, **overrides)
    return TrainConfig(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    t0 = time.time()
    try:
        result = train(cfg, progress=not args.no_progress)
    except (NonFiniteLossError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
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
