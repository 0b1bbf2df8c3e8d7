"""`python -m spotlight_jax.bench generate`: end-to-end decode tokens/s, dense vs spotlight, at long context.

Same jitted decode loop as `bench decode` (the model code generate() runs), Qwen2.5-7B shape with random bf16 weights
and a random (untrained) 128-bit SpotlightHash stack: values change neither the bytes moved nor the kernels' work.
Spotlight's roofline counts what a step must read: weights + the dense layers' whole KV + every sparse layer's key
codes + the selected K/V rows (k = 2 % of the context).
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from spotlight_jax.bench.common import kernel_categories, roofline_us, run_folder, write_results
from spotlight_jax.bench.decode import random_model, time_decode_steps, weight_bytes_per_step
from spotlight_jax.cli import method_fields, option, out_dir_field, preset_field
from spotlight_jax.config import ModelConfig, RetrievalConfig, split_method
from spotlight_jax.hashing import HashConfig, HashStack


@dataclasses.dataclass(frozen=True)
class GenerateBenchConfig:
    model: str = preset_field("qwen2.5-7b")
    context: tuple[int, ...] = option((32768, 131072), "live tokens in the cache")
    batch: tuple[int, ...] | None = option(None, "batch sizes (default: 1 and the largest batch dense fits)", type=int,
                                           nargs="+")  # fmt: skip
    methods: tuple[str, ...] = option(("dense", "spotlight"), "dense, spotlight, linear (+sink<N>, +recent<N>, ...)")
    bits: int = option(128, "code bits of the random hash stack")
    keep_ratio: float = option(0.02, "share of the cached rows a sparse step reads")
    steps: int = option(16, "decode steps per timed program")
    repeats: int = option(5, "timed runs of each program (median reported)")
    memory_fraction: float = option(0.85, "share of the memory limit weights + caches use")
    name: str = option("generate_speed", "stem of the result files")
    profile: bool = option(False, "also print per-kernel device time per step (profiler)")
    profile_top: int = option(16, "kernels listed per profile")
    tp: int = option(1, "tensor parallelism over this many GPUs (heads split)")
    out_dir: str | None = out_dir_field("bench")


CONFIG = GenerateBenchConfig


def kv_bytes_per_token(cfg: ModelConfig, layers: int | None = None) -> int:
    return 2 * (layers if layers is not None else cfg.num_layers) * cfg.num_kv_heads * cfg.head_dim * 2  # bf16


def largest_dense_batch(cfg: ModelConfig, context: int, weight_bytes: int, fraction: float, tp: int = 1) -> int:
    """Largest batch whose bf16 KV cache fits beside the weights (and spotlight's code cache) in device memory.

    `weight_bytes`: what one device holds; with `tp` devices each holds 1 / tp of every sequence's caches."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        raise ValueError("this allocator reports no memory limit: give the batch sizes explicitly (--batch)")
    total = stats["bytes_limit"]
    per_seq = context * (kv_bytes_per_token(cfg) + cfg.num_layers * cfg.num_kv_heads * 16) / tp
    return max(1, int((fraction * total - weight_bytes) // per_seq))


def step_roofline_bytes(cfg, method, batch, context, wbytes, rcfg: RetrievalConfig, tp: int = 1) -> tuple[int, dict]:
    """Bytes one device reads per step (`wbytes`: its weights; caches split over `tp` devices), and the parts (GB,
    all devices)."""
    if method == "dense":
        kv = batch * context * kv_bytes_per_token(cfg)
        return wbytes + kv // tp, {"kv_read_GB": kv / 1e9}
    sparse = [i for i in range(cfg.num_layers) if rcfg.is_sparse_layer(i)]
    dense_kv = batch * context * kv_bytes_per_token(cfg, cfg.num_layers - len(sparse))
    codes = batch * len(sparse) * cfg.num_kv_heads * context * rcfg.bits // 8
    selected = batch * rcfg.k_max(context) * kv_bytes_per_token(cfg, len(sparse))
    parts = {"kv_read_GB": (dense_kv + selected) / 1e9, "codes_read_GB": codes / 1e9}
    return wbytes + (dense_kv + codes + selected) // tp, parts


def add_speedups(rows: list[dict]) -> None:
    """Sets `speedup_vs_dense` of every sparse row (one context): tokens/s over the fastest dense row of its batch
    (plain dense or a variant such as dense+prologue, named in `vs`), so a faster dense is what a speed-up is quoted
    against."""
    is_dense = lambda r: split_method(r["method"])[0] == "dense"
    best: dict[int, dict] = {}
    for r in filter(is_dense, rows):
        if r["tokens_per_s"] > best.get(r["batch"], {}).get("tokens_per_s", 0):
            best[r["batch"]] = r
    for r in rows:
        if not is_dense(r) and r["batch"] in best:
            r["speedup_vs_dense"] = round(r["tokens_per_s"] / best[r["batch"]]["tokens_per_s"], 2)
            if best[r["batch"]]["method"] != "dense":
                r["vs"] = best[r["batch"]]["method"]


def run(opts: GenerateBenchConfig) -> list[dict]:
    fields = {m: method_fields(m) for m in opts.methods}  # a bad spec fails before the weights are made
    cfg = ModelConfig.preset(opts.model)
    model = random_model(cfg)
    hashes = HashStack(cfg, HashConfig(kind="spotlight", bits=opts.bits), rngs=nnx.Rngs(0))
    mesh = None
    if opts.tp > 1:
        from spotlight_jax import parallel

        mesh = parallel.tp_mesh(opts.tp)
        model, hashes = parallel.shard_model(model, mesh), parallel.shard_hashes(hashes, mesh)
    per_dev = mesh is not None
    rows = []
    for ctx in opts.context:
        wbytes = weight_bytes_per_step(model, 1, per_device=per_dev)
        # Only without explicit batches: an allocator that reports no memory limit can still run given ones.
        batches = opts.batch or sorted({1, largest_dense_batch(cfg, ctx + opts.steps, wbytes, opts.memory_fraction,
                                                               opts.tp)})  # fmt: skip
        print(f"context {ctx}: batches {batches}", flush=True)
        for batch in batches:
            for method in opts.methods:
                rcfg = RetrievalConfig(**{"keep_ratio": opts.keep_ratio, "bits": opts.bits, "mesh": mesh,
                                          **fields[method]})  # fmt: skip
                try:
                    res = time_decode_steps(
                        model, cfg, batch, ctx, opts.steps, opts.repeats, rcfg,
                        hashes if rcfg.method in ("spotlight", "linear") else None, profile=opts.profile,
                        top=opts.profile_top,
                    )  # fmt: skip
                except Exception as e:  # noqa: BLE001 - an OOM at one size must not lose the other rows
                    print(f"{method} batch {batch} context {ctx}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                wb = weight_bytes_per_step(model, batch, per_device=per_dev)
                nbytes, parts = step_roofline_bytes(cfg, rcfg.method, batch, ctx, wb, rcfg, opts.tp)
                step_ms = res["step_s"] * 1e3
                rows.append({
                    "method": method, "context": ctx, "batch": batch, "step_ms": round(step_ms, 3),
                    "tokens_per_s": round(batch / res["step_s"], 1),
                    "roofline_ms": round(roofline_us(nbytes) / 1e3, 3),
                    "x_roofline": round(step_ms / (roofline_us(nbytes) / 1e3), 3),
                    **{k: round(v, 2) for k, v in parts.items()},
                    "kv_cache_GB": round(res["cache_bytes"]["kv"] / 1e9, 2),
                    "code_cache_GB": round(res["cache_bytes"]["codes"] / 1e9, 3),
                    "xla_temp_GB": round(res["temp_bytes"] / 1e9, 2),
                })  # fmt: skip
                if res.get("profile"):  # kernel time without the gaps between kernels, per GPU and category
                    rows[-1]["device_ms"] = round(res["profile"][0] / 1e3 / opts.tp, 3)
                    for cat, us in kernel_categories(res["profile"][1]).items():
                        rows[-1][f"{cat}_ms"] = round(us / 1e3 / opts.tp, 3)
                print(rows[-1], flush=True)
            add_speedups([r for r in rows if r["context"] == ctx])
    meta = {"steps_per_program": opts.steps, "model": opts.model, "tp": opts.tp}
    print(write_results(opts.name, rows, meta, run_folder("bench", "generate", opts.out_dir)))
    return rows
