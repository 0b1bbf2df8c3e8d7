"""`python -m spotlight_jax.bench train`: hash-training speed on synthetic activations (no model, no network).

Modes:
- `step` (default): steps/s of one layer's train step at a real shape (default Qwen2.5-7B: 28 q / 4 KV heads,
  head_dim 128, 8K-token samples, paper sampling 1024 queries / 1024 top / 1024 other keys). Activations are random
  bf16 arrays already on the device, so this times the step itself. Target: >= 10 steps/s on an H100.
- `model`: the real `train()` loop (host memmap-free in-memory activations -> device, orbax checkpoints, export) over
  every non-dense layer of a model shape (default SmolLM2-135M: 28 layers) at `--steps-per-layer` (default 8192: the
  paper's 8192 samples, one per step — an assumption, set it to what you compare with). `--time-layers N` runs only
  N layers and extrapolates the whole-model wall time.

The result is printed and written as `<--out-dir>/<--name>.json` (default: runs/bench/train-<time>/train_<mode>.json).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spotlight_jax.bench.common import run_folder
from spotlight_jax.cli import option, out_dir_field, preset_field
from spotlight_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TrainBenchConfig:
    mode: str = option("step", "step: one layer's train step; model: the whole train() loop", choices=("step", "model"))
    model: str | None = preset_field(None, note="default: qwen2.5-7b in step mode, smollm2-135m in model mode",
                                     aliases=("shape",))  # fmt: skip
    seq_len: int = option(8192, "tokens per synthetic sample")
    batch: int = option(1, "samples per step", aliases=("batch-size",))
    bits: int = option(128, "code bits")
    max_queries: int = option(1024, "sampled queries per sample (paper: 1024)", aliases=("queries",))
    max_top: int = option(1024, "top keys per query")
    max_other: int = option(1024, "other keys per query")
    query_chunk: int = option(4096, "rows per chunk of the pairwise loss")
    steps: int = option(50, "step mode: timed steps per repeat")
    repeats: int = option(5, "step mode: timed repeats (median reported)")
    steps_per_layer: int = option(8192, "model mode: steps per layer")
    time_layers: int = option(0, "model mode: run only this many layers, extrapolate (0: all)")
    num_samples: int = option(4, "model mode: synthetic samples per layer")
    name: str | None = option(None, "stem of the result file (default: train_<mode>)")
    out_dir: str | None = out_dir_field("bench")


CONFIG = TrainBenchConfig


def _train_config(opts: TrainBenchConfig, **kw):
    from spotlight_jax.train import TrainConfig

    return TrainConfig(
        bits=opts.bits, max_queries=opts.max_queries, max_top=opts.max_top, max_other=opts.max_other,
        min_query_position=0, query_chunk=opts.query_chunk, batch_size=opts.batch, **kw,
    )  # fmt: skip


def bench_step(opts: TrainBenchConfig) -> dict:
    from spotlight_jax.hashing import HashStack
    from spotlight_jax.train import make_optimizer, train_step

    cfg = ModelConfig.preset(opts.model or "qwen2.5-7b")
    tc = _train_config(opts, steps_per_layer=10_000)
    layer = 2
    module = HashStack(cfg, tc.hash_config(), layers=[layer], rngs=nnx.Rngs(0)).for_layer(layer)
    graphdef, params = nnx.split(module)
    tx, loss_cfg = make_optimizer(tc), tc.loss_config()
    opt_state = tx.init(params)
    b, t, h = opts.batch, opts.seq_len, cfg.head_dim
    pool = []  # two device-resident synthetic batches, alternated so no step sees the same input twice in a row
    for i in range(2):
        kq, kk = jax.random.split(jax.random.key(i))
        q = jax.random.normal(kq, (b, cfg.num_heads, t, h), jnp.bfloat16)
        k = jax.random.normal(kk, (b, cfg.num_kv_heads, t, h), jnp.bfloat16)
        pool.append((q, k))

    t0 = time.perf_counter()
    params, opt_state, m = train_step(
        graphdef, params, opt_state, *pool[0], jax.random.key(0), tx=tx, loss_cfg=loss_cfg
    )
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    rates = []
    step = 1
    for _ in range(opts.repeats):
        t0 = time.perf_counter()
        for _ in range(opts.steps):
            params, opt_state, m = train_step(
                graphdef, params, opt_state, *pool[step % 2], jax.random.key(step), tx=tx, loss_cfg=loss_cfg
            )
            step += 1
        jax.block_until_ready((params, m))
        rates.append(opts.steps / (time.perf_counter() - t0))
    m = jax.device_get(m)
    return {
        "mode": "step",
        "device": str(jax.devices()[0].device_kind),
        "shape": cfg.name,
        "heads": f"{cfg.num_heads} q / {cfg.num_kv_heads} kv, head_dim {cfg.head_dim}",
        "seq_len": t,
        "batch_size": b,
        "queries": opts.max_queries,
        "max_top": opts.max_top,
        "max_other": opts.max_other,
        "bits": opts.bits,
        "compile_s": round(compile_s, 2),
        "steps_per_s_median": round(statistics.median(rates), 2),
        "steps_per_s_all": [round(r, 2) for r in rates],
        "last_loss": float(m["loss"]),
        "pairs_per_step": float(m["pairs"]),
    }


def bench_model(opts: TrainBenchConfig) -> dict:
    from spotlight_jax.activations import synthetic_activations
    from spotlight_jax.hashing import non_dense_layers
    from spotlight_jax.train import train

    cfg = ModelConfig.preset(opts.model or "smollm2-135m")
    all_layers = non_dense_layers(cfg.num_layers)
    layers = all_layers[: opts.time_layers] if opts.time_layers else all_layers
    acts = synthetic_activations(cfg, layers, opts.num_samples, opts.seq_len, dtype=jnp.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        tc = _train_config(
            opts, steps_per_layer=opts.steps_per_layer, out_dir=tmp, layers=tuple(layers), seq_len=opts.seq_len,
            checkpoint_every=max(1000, opts.steps_per_layer // 4), log_every=100,
        )  # fmt: skip
        t0 = time.perf_counter()
        res = train(tc, activations=acts)
        wall = time.perf_counter() - t0
    per_layer = [r["seconds"] for r in res.summary.values()]
    steady = statistics.median(per_layer[1:]) if len(per_layer) > 1 else per_layer[0]  # layer 1 pays the compile
    return {
        "mode": "model",
        "device": str(jax.devices()[0].device_kind),
        "shape": cfg.name,
        "layers_run": len(layers),
        "layers_total": len(all_layers),
        "steps_per_layer": opts.steps_per_layer,
        "seq_len": opts.seq_len,
        "train_config": dataclasses.asdict(tc),
        "wall_s": round(wall, 1),
        "per_layer_s": per_layer,
        "steps_per_s_steady": round(opts.steps_per_layer / steady, 2),
        "extrapolated_all_layers_s": round(wall + steady * (len(all_layers) - len(layers)), 1),
        "mean_final_ranking_error": float(np.mean([r["final_ranking_error"] for r in res.summary.values()])),
    }


def run(opts: TrainBenchConfig) -> dict:
    result = bench_step(opts) if opts.mode == "step" else bench_model(opts)
    for k, v in result.items():
        if k != "train_config":
            print(f"{k:>28}: {v}")
    path = os.path.join(run_folder("bench", "train", opts.out_dir), f"{opts.name or 'train_' + opts.mode}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {path}")
    return result
