"""`python -m spotlight_jax.bench train`: hash-training speed on synthetic activations (no model, no network).

Modes:
- `step` (default): steps/s of one layer's train step at a real shape (default Qwen2.5-7B: 28 q / 4 KV heads,
  head_dim 128, 8K-token samples, paper sampling 1024 queries / 1024 top / 1024 other keys). Activations are random
  bf16 arrays already on the device, so this times the step itself. Target: >= 10 steps/s on an H100.
- `model`: the real `train()` loop (host memmap-free in-memory activations -> device, orbax checkpoints, export) over
  every non-dense layer of a model shape (default SmolLM2-135M: 28 layers) at `--steps-per-layer` (default 8192: the
  paper's 8192 samples, one per step — an assumption, set it to what you compare with). `--time-layers N` runs only
  N layers and extrapolates the whole-model wall time.
"""

from __future__ import annotations

import argparse
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

from spotlight_jax.config import ModelConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["step", "model"], default="step")
    p.add_argument("--shape", default=None, help="model preset: qwen2.5-7b (step default) | llama3-8b | smollm2-135m")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per synthetic sample")
    p.add_argument("--batch-size", type=int, default=1, help="samples per step")
    p.add_argument("--bits", type=int, default=128)
    p.add_argument("--queries", type=int, default=1024, help="sampled queries per sample (paper: 1024)")
    p.add_argument("--max-top", type=int, default=1024)
    p.add_argument("--max-other", type=int, default=1024)
    p.add_argument("--query-chunk", type=int, default=4096, help="rows per chunk of the pairwise loss")
    p.add_argument("--steps", type=int, default=50, help="step mode: timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5, help="step mode: timed repeats (median reported)")
    p.add_argument("--steps-per-layer", type=int, default=8192, help="model mode: steps per layer")
    p.add_argument("--time-layers", type=int, default=0, help="model mode: run only this many layers, extrapolate")
    p.add_argument("--num-samples", type=int, default=4, help="model mode: synthetic samples per layer")
    p.add_argument("--out", default=None, help="write the result as JSON here")


def _train_config(args, **kw):
    from spotlight_jax.train import TrainConfig

    return TrainConfig(
        bits=args.bits, max_queries=args.queries, max_top=args.max_top, max_other=args.max_other,
        min_query_position=0, query_chunk=args.query_chunk, batch_size=args.batch_size, **kw,
    )  # fmt: skip


def bench_step(args) -> dict:
    from spotlight_jax.hashing import HashStack
    from spotlight_jax.train import make_optimizer, train_step

    cfg = ModelConfig.preset(args.shape or "qwen2.5-7b")
    tc = _train_config(args, steps_per_layer=10_000)
    layer = 2
    module = HashStack(cfg, tc.hash_config(), layers=[layer], rngs=nnx.Rngs(0)).for_layer(layer)
    graphdef, params = nnx.split(module)
    tx, loss_cfg = make_optimizer(tc), tc.loss_config()
    opt_state = tx.init(params)
    b, t, h = args.batch_size, args.seq_len, cfg.head_dim
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
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            params, opt_state, m = train_step(
                graphdef, params, opt_state, *pool[step % 2], jax.random.key(step), tx=tx, loss_cfg=loss_cfg
            )
            step += 1
        jax.block_until_ready((params, m))
        rates.append(args.steps / (time.perf_counter() - t0))
    m = jax.device_get(m)
    return {
        "mode": "step",
        "device": str(jax.devices()[0].device_kind),
        "shape": cfg.name,
        "heads": f"{cfg.num_heads} q / {cfg.num_kv_heads} kv, head_dim {cfg.head_dim}",
        "seq_len": t,
        "batch_size": b,
        "queries": args.queries,
        "max_top": args.max_top,
        "max_other": args.max_other,
        "bits": args.bits,
        "compile_s": round(compile_s, 2),
        "steps_per_s_median": round(statistics.median(rates), 2),
        "steps_per_s_all": [round(r, 2) for r in rates],
        "last_loss": float(m["loss"]),
        "pairs_per_step": float(m["pairs"]),
    }


def bench_model(args) -> dict:
    from spotlight_jax.activations import synthetic_activations
    from spotlight_jax.hashing import non_dense_layers
    from spotlight_jax.train import train

    cfg = ModelConfig.preset(args.shape or "smollm2-135m")
    all_layers = non_dense_layers(cfg.num_layers)
    layers = all_layers[: args.time_layers] if args.time_layers else all_layers
    acts = synthetic_activations(cfg, layers, args.num_samples, args.seq_len, dtype=jnp.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        tc = _train_config(
            args, steps_per_layer=args.steps_per_layer, out_dir=tmp, layers=tuple(layers), seq_len=args.seq_len,
            checkpoint_every=max(1000, args.steps_per_layer // 4), log_every=100,
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
        "steps_per_layer": args.steps_per_layer,
        "seq_len": args.seq_len,
        "train_config": dataclasses.asdict(tc),
        "wall_s": round(wall, 1),
        "per_layer_s": per_layer,
        "steps_per_s_steady": round(args.steps_per_layer / steady, 2),
        "extrapolated_all_layers_s": round(wall + steady * (len(all_layers) - len(layers)), 1),
        "mean_final_ranking_error": float(np.mean([r["final_ranking_error"] for r in res.summary.values()])),
    }


def run(args: argparse.Namespace) -> int:
    result = bench_step(args) if args.mode == "step" else bench_model(args)
    for k, v in result.items():
        if k != "train_config":
            print(f"{k:>28}: {v}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0
