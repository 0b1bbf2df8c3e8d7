"""`python -m spotlight_jax.bench e2e`: prompt -> tokens through the public `generate()`, at long context.

Every row is one `generate()` call as a user makes it (Qwen2.5-7B shape, random bf16 weights, random prompt tokens
of the given length, a random 128-bit SpotlightHash stack for spotlight): the chunked prefill, the key-code cache
filled during it, then the decode loop. A streamer times the call from inside the compiled program:

- compile_s: from the call until the program starts executing (tracing, compilation, transfers);
- ttft_s: from then until the first token is produced: the prefill (plus one sampling step);
- decode_tok_s: tokens of all rows per second between the first and the last streamed token.

Each configuration runs in its own process (the default on a GPU), so that `peak_GB` (the allocator's peak) is that
configuration's alone; `prefill_extra_GB` = peak - weights - caches is what the prefill holds beyond them, which
grows with the chunk, not with T x S. `prefill_tflops` counts 2 x non-embedding parameters x T plus the causal
attention 2 x T^2 x (q heads x head_dim) x layers per row, over ttft_s; the bf16 GEMM rate of the same device is
measured in the same run (`gemm` row) to read it against.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

from spotlight_jax.cli import option, out_dir_field, preset_field

ROW_PREFIX = "E2E_ROW "


@dataclasses.dataclass(frozen=True)
class E2EConfig:
    model: str = preset_field("qwen2.5-7b")
    context: tuple[int, ...] = option((32768, 131072), "cache length; the prompt is context - new tokens")
    new_tokens: int = option(64, "tokens generated per row")
    batch: tuple[int, ...] | None = option(None, "batch sizes (default: 1 and the largest batch dense fits)", type=int,
                                           nargs="+")  # fmt: skip
    methods: tuple[str, ...] = option(("dense", "spotlight"), "dense, spotlight (+sink<N> ...)")
    chunk: int | None = option(None, "prefill chunk (default: the library's)", type=int)
    prefill_attention: str | None = option(None, "chunk attention kernel (default: the library's)",
                                           choices=("pallas", "cudnn", "xla"))  # fmt: skip
    keep_ratio: float = option(0.02, "share of the cached rows a sparse step reads")
    bits: int = option(128, "code bits of the random hash stack")
    memory_fraction: float = option(0.85, "share of memory weights + caches may use")
    isolate: bool | None = option(None, "one process per configuration (default: on a GPU)", boolean=True)
    name: str = option("e2e_generate", "stem of the result files")
    out_dir: str | None = out_dir_field("bench")


CONFIG = E2EConfig


def prefill_flops(cfg, prompt: int, batch: int, non_embedding_params: int) -> float:
    attention = 2.0 * prompt * prompt * cfg.num_heads * cfg.head_dim * cfg.num_layers
    return batch * (2.0 * non_embedding_params * prompt + attention)


class _Clock:
    """A `generate()` streamer that keeps timestamps: program start, and each step's tokens."""

    def __init__(self):
        self.start, self.steps = None, []

    def on_start(self):
        self.start = time.perf_counter()

    def __call__(self, i, tokens):
        self.steps.append(time.perf_counter())


def run_one(spec: dict) -> dict:
    """One configuration, in this process: {model, context, batch, method, new_tokens, ...} -> result row."""
    import jax
    from flax import nnx

    from spotlight_jax.bench.decode import random_model
    from spotlight_jax.bench.generate import method_fields
    from spotlight_jax.config import ModelConfig, PrefillConfig, RetrievalConfig
    from spotlight_jax.generate import generate
    from spotlight_jax.hashing import HashConfig, HashStack
    from spotlight_jax.model import init_cache

    if spec["method"] == "gemm":
        from spotlight_jax.bench.attention import gemm_row

        return {"method": "gemm", "gemm_tflops": gemm_row(8192, repeats=5, iters=0)["tflops"]}
    cfg = ModelConfig.preset(spec["model"])
    model = random_model(cfg)
    rcfg = RetrievalConfig(keep_ratio=spec["keep_ratio"], bits=spec["bits"], **method_fields(spec["method"]))
    hashes = None
    if rcfg.method in ("spotlight", "linear"):
        hashes = HashStack(cfg, HashConfig(kind=rcfg.method, bits=spec["bits"]), rngs=nnx.Rngs(0))
    batch, context, new = spec["batch"], spec["context"], spec["new_tokens"]
    prompt = context - new
    rows = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt), dtype=np.int32)
    params = nnx.state(model, nnx.Param)
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    # The prefill computes logits for one token per chunk, so neither the embedding nor an untied output head
    # counts as per-token work.
    head = 0 if model.lm_head is None else model.lm_head.kernel[...].size
    non_embedding = sum(x.size for x in jax.tree.leaves(params)) - model.embed.embedding[...].size - head
    cache_bytes = jax.eval_shape(lambda: init_cache(cfg, batch, context, model.dtype, rcfg))
    cache_total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache_bytes))

    clock = _Clock()
    t0 = time.perf_counter()
    out = generate(
        model, list(rows), max_new_tokens=new, retrieval_cfg=rcfg, hashes=hashes, max_len=context,
        eos_token_ids=[], prefill_cfg=PrefillConfig(chunk=spec.get("chunk"), attention=spec.get("prefill_attention")),
        streamer=clock,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    assert out.tokens.shape == (batch, new) and len(clock.steps) == new, (out.tokens.shape, len(clock.steps))
    ttft = clock.steps[0] - clock.start
    decode_s = clock.steps[-1] - clock.steps[0]
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use", 0)
    flops = prefill_flops(cfg, prompt, batch, non_embedding)
    return {
        "method": spec["method"], "context": context, "prompt": prompt, "batch": batch, "new_tokens": new,
        "compile_s": round(clock.start - t0, 1), "ttft_s": round(ttft, 3),
        "prefill_tokens_per_s": round(batch * prompt / ttft, 0), "prefill_tflops": round(flops / ttft / 1e12, 1),
        "decode_tok_s": round(batch * (new - 1) / decode_s, 1), "decode_step_ms": round(decode_s / (new - 1) * 1e3, 2),
        "wall_s": round(wall, 2), "weights_GB": round(weights / 1e9, 2), "caches_GB": round(cache_total / 1e9, 2),
        "peak_GB": round(peak / 1e9, 2) if peak else None,
        "prefill_extra_GB": round((peak - weights - cache_total) / 1e9, 2) if peak else None,
        "chunk": spec.get("chunk") or "default",
    }  # fmt: skip


def _largest_batch(model_name: str, context: int, fraction: float) -> int:
    """The largest batch whose dense bf16 caches fit beside the weights (bench generate's rule), asked of a child
    process so that this one never holds the GPU."""
    code = (
        "import sys; from spotlight_jax.bench.generate import largest_dense_batch; "
        "from spotlight_jax.config import ModelConfig; from spotlight_jax.bench.decode import random_model; "
        "from spotlight_jax.bench.decode import weight_bytes_per_step; "
        f"cfg = ModelConfig.preset({model_name!r}); m = random_model(cfg); "
        f"print('BATCH', largest_dense_batch(cfg, {context}, weight_bytes_per_step(m, 1), {fraction}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(next(line.split()[1] for line in out.splitlines() if line.startswith("BATCH")))


def child(spec_json: str) -> None:
    """A child process's whole work: one configuration, its row on stdout after `ROW_PREFIX`."""
    print(ROW_PREFIX + json.dumps(run_one(json.loads(spec_json))), flush=True)


def _spawn(spec: dict) -> dict | None:
    code = "import sys; from spotlight_jax.bench.e2e import child; child(sys.argv[1])"
    cmd = [sys.executable, "-c", code, json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    rows = [json.loads(line[len(ROW_PREFIX) :]) for line in proc.stdout.splitlines() if line.startswith(ROW_PREFIX)]
    if proc.returncode or not rows:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"  {spec['method']} B{spec.get('batch')} {spec.get('context')}: failed: {' | '.join(tail)}", flush=True)
        return None
    return rows[0]


def run(opts: E2EConfig) -> list[dict]:
    import jax

    from spotlight_jax.bench.common import run_folder, write_results
    from spotlight_jax.cli import method_fields

    for method in opts.methods:  # a bad spec fails here, not in every child process
        method_fields(method)

    isolate = opts.isolate if opts.isolate is not None else jax.default_backend() != "cpu"
    execute = _spawn if isolate else run_one
    base = dict(model=opts.model, new_tokens=opts.new_tokens, keep_ratio=opts.keep_ratio, bits=opts.bits,
                chunk=opts.chunk, prefill_attention=opts.prefill_attention)  # fmt: skip
    rows = []
    gemm = execute({**base, "method": "gemm"}) if jax.default_backend() != "cpu" else None
    if gemm:
        rows.append(gemm)
        print(gemm, flush=True)
    for ctx in opts.context:
        batches = opts.batch or sorted({1, _largest_batch(opts.model, ctx, opts.memory_fraction)})
        print(f"context {ctx}: batches {batches}", flush=True)
        for batch in batches:
            for method in opts.methods:
                row = execute({**base, "context": ctx, "batch": batch, "method": method})
                if row is None:
                    continue
                if gemm:
                    row["x_gemm_rate"] = round(row["prefill_tflops"] / gemm["gemm_tflops"], 3)
                rows.append(row)
                print(row, flush=True)
                dense = next((r for r in rows if r.get("context") == ctx and r.get("batch") == batch
                              and r["method"] == "dense"), None)  # fmt: skip
                if dense is not None and method != "dense":
                    row["decode_speedup_vs_dense"] = round(row["decode_tok_s"] / dense["decode_tok_s"], 2)
    meta = {"model": opts.model, "new_tokens": opts.new_tokens, "isolated_processes": isolate}
    print(write_results(opts.name, rows, meta, run_folder("bench", "e2e", opts.out_dir)))
    return rows
