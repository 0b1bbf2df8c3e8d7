"""`python -m spotlight_jax.bench decode`: the dense decode step of a real-shape model with random weights.

Each measurement is one jitted `fori_loop` of `--steps` decode steps through the same model code generate() uses
(every step reads all weights and the whole live KV cache, and writes one new row), so dispatch is amortised.
Roofline = (weights read + KV cache read) / the device's copy bandwidth (3.0 TB/s H100, 4.3 TB/s H200).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
from flax import nnx

from spotlight_jax.bench.common import median, profile_kernels, roofline_us, run_folder, time_jitted, write_results
from spotlight_jax.cli import option, out_dir_field, preset_field
from spotlight_jax.config import ModelConfig, RetrievalConfig
from spotlight_jax.model import CausalLM, KVCache, init_cache


@dataclasses.dataclass(frozen=True)
class DecodeBenchConfig:
    model: str = preset_field("qwen2.5-7b")
    batch: tuple[int, ...] = option((1, 8), "batch sizes")
    context: tuple[int, ...] = option((4096, 32768), "live tokens in the cache")
    steps: int = option(32, "decode steps per timed program")
    repeats: int = option(5, "timed runs of each program (median reported)")
    name: str = option("decode_dense", "stem of the result files")
    out_dir: str | None = out_dir_field("bench")

    def __post_init__(self):  # before the (minutes of) random weights
        if min(self.batch, default=0) < 1 or min(self.context, default=0) < 1 or min(self.steps, self.repeats) < 1:
            raise ValueError(
                f"batch, context, steps and repeats must be >= 1, got batch {self.batch}, context {self.context}, "
                f"steps {self.steps}, repeats {self.repeats}"
            )


CONFIG = DecodeBenchConfig


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _random(key, shape, dtype):
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_model(cfg: ModelConfig, dtype=jnp.bfloat16, seed: int = 0) -> CausalLM:
    """Random weights of the real shapes, made on the device one parameter at a time (values do not change speed).

    One small jitted generator per distinct shape (the layers share shapes), instead of one huge program: a single
    jitted constructor takes minutes to compile at 7B scale.
    """
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [_random(k, tuple(x.shape), x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def weight_bytes_per_step(model: CausalLM, batch: int, per_device: bool = False) -> int:
    """Bytes of parameters one decode step reads: everything but the embedding table, of which only B rows.

    `per_device`: what one device of a tensor-parallel mesh reads (its shard of each parameter)."""
    cfg = model.cfg
    size = (lambda x: x.addressable_shards[0].data.nbytes) if per_device else (lambda x: x.nbytes)
    total = sum(size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    embed = model.embed.embedding[...]
    if cfg.tie_word_embeddings:  # the table is read whole as the output projection
        return total
    return total - size(embed) + batch * cfg.hidden_size * embed.dtype.itemsize


def random_cache(
    cfg: ModelConfig, batch: int, max_len: int, dtype, retrieval_cfg=None, seed: int = 1, sharding=None
) -> KVCache:
    """A cache full of random values (never time on zeros), every layer its own buffer (the loop donates them).

    `sharding`: where each [B, K, S, X] buffer lives (e.g. split on K over a tensor-parallel mesh); made in place."""
    # Shapes only: materialising the zero cache first would hold two caches at once (an OOM at large batch).
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, max_len, dtype, retrieval_cfg))
    key = jax.random.key(seed)
    base = jax.jit(lambda: _random(key, cache.k[0].shape, dtype) * 50.0, out_shardings=sharding)()  # ~N(0, 1)
    scaled = jax.jit(lambda x, s: x * s, out_shardings=sharding)  # one tiny program, reused for every layer
    k = tuple(scaled(base, jnp.asarray(1.0 + 1e-3 * i, dtype)) for i in range(cfg.num_layers))
    v = tuple(scaled(base, jnp.asarray(1.0 - 1e-3 * i, dtype)) for i in range(cfg.num_layers))
    bits = jax.jit(lambda i, shape: jax.random.bits(jax.random.fold_in(key, i), shape, jnp.uint32),
                   static_argnums=1, out_shardings=sharding)  # fmt: skip
    codes = tuple(None if c is None else bits(i, c.shape) for i, c in enumerate(cache.codes))
    return KVCache(k, v, codes)


@functools.partial(jax.jit, static_argnames=("graphdef", "hash_graphdef", "steps", "retrieval_cfg"), donate_argnums=4)
def decode_loop(graphdef, state, hash_graphdef, hash_state, cache, tok, lengths, *, steps, retrieval_cfg):
    """`steps` greedy decode steps from a filled cache; returns the final token (and cache) so nothing is dead code."""
    model = nnx.merge(graphdef, state)
    hashes = nnx.merge(hash_graphdef, hash_state) if hash_graphdef is not None else None

    def body(_, carry):
        cache, tok, lengths = carry
        out = model(
            tok[:, None], positions=lengths[:, None], cache=cache, lengths=lengths + 1,
            retrieval_cfg=retrieval_cfg, hashes=hashes, logits="last",
        )  # fmt: skip
        return out.cache, jnp.argmax(out.logits[:, 0], -1).astype(jnp.int32), lengths + 1

    return jax.lax.fori_loop(0, steps, body, (cache, tok, lengths))


def time_decode_steps(
    model, cfg, batch, context, steps, repeats, retrieval_cfg=None, hashes=None, profile: bool = False, top: int = 16
) -> dict:
    """Median seconds per decode step at `context` live tokens (cache sized context + steps).

    With `profile`, one more run goes under the profiler: per-kernel device time per step (printed, and returned as
    "profile": (device us per step, {kernel: us per step})).
    """
    rcfg = retrieval_cfg or RetrievalConfig()
    graphdef, state = nnx.split(model)
    hash_graphdef, hash_state = nnx.split(hashes) if hashes is not None else (None, None)
    tok = jnp.ones((batch,), jnp.int32)
    lengths = jnp.full((batch,), context, jnp.int32)
    sharding = None
    if rcfg.mesh is not None:  # tensor parallel: caches split on the KV-head axis
        from spotlight_jax.parallel import cache_sharding

        sharding = cache_sharding(rcfg.mesh)
    holder = {"cache": random_cache(cfg, batch, context + steps, model.dtype, rcfg, sharding=sharding)}
    cache_bytes = holder["cache"].nbytes()

    def run_once():
        # The cache is donated and comes back; keep the new one for the next run (same live length each time).
        cache, t, _ = decode_loop(
            graphdef, state, hash_graphdef, hash_state, holder["cache"], tok, lengths, steps=steps, retrieval_cfg=rcfg
        )
        holder["cache"] = cache
        return t

    t0 = time.perf_counter()
    compiled = decode_loop.lower(
        graphdef, state, hash_graphdef, hash_state, holder["cache"], tok, lengths, steps=steps, retrieval_cfg=rcfg
    ).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes  # a whole-cache copy inside the loop would show up here
    print(f"  compiled: temp {temp / 1e9:.2f} GB beside a {cache_bytes['kv'] / 1e9:.2f} GB KV cache", flush=True)
    jax.block_until_ready(run_once())  # compile + warm-up
    print(f"  batch {batch} context {context} {rcfg.method}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    times = time_jitted(run_once, repeats=repeats, warmup=0)
    prof = None
    if profile:
        try:
            prof = profile_kernels(run_once, f"{rcfg.method} B{batch} {context}", per=steps, top=top)
        except Exception as e:  # noqa: BLE001 - profiling is best effort
            print(f"    profile failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    holder.clear()  # free the cache before the next configuration allocates its own
    return {"step_s": median(times) / steps, "cache_bytes": cache_bytes, "temp_bytes": temp, "profile": prof}


def run(opts: DecodeBenchConfig) -> list[dict]:
    cfg = ModelConfig.preset(opts.model)
    t0 = time.perf_counter()
    model = random_model(cfg)
    jax.block_until_ready(nnx.state(model))
    print(f"random {opts.model} weights ready in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for batch in opts.batch:
        wbytes = weight_bytes_per_step(model, batch)
        for ctx in opts.context:
            kv_read = 2 * cfg.num_layers * batch * cfg.num_kv_heads * ctx * cfg.head_dim * 2  # bf16 K and V
            roof = roofline_us(wbytes + kv_read)
            res = time_decode_steps(model, cfg, batch, ctx, opts.steps, opts.repeats)
            step_us = res["step_s"] * 1e6
            rows.append({
                "model": opts.model, "batch": batch, "context": ctx, "step_us": round(step_us, 1),
                "roofline_us": round(roof, 1), "x_roofline": round(step_us / roof, 3),
                "weights_GB": round(wbytes / 1e9, 2), "kv_read_GB": round(kv_read / 1e9, 2),
                "tokens_per_s": round(batch / res["step_s"], 1), "xla_temp_GB": round(res["temp_bytes"] / 1e9, 2),
            })  # fmt: skip
            print(rows[-1], flush=True)
    print(
        write_results(opts.name, rows, {"steps_per_program": opts.steps}, run_folder("bench", "decode", opts.out_dir))
    )
    return rows
