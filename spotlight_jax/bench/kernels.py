"""``python -m spotlight_jax.bench kernels``: speed of the retrieval and sparse-attention kernels.

For every (model shape, batch, cache length) it times, inside one jitted program, many calls on
inputs that change per call (distinct query codes / index sets; key codes and KV caches rotated
among enough copies that their total exceeds the 50 MB L2), and reports the median per call:

- ``topk``: hamming_topk (codes in HBM -> indices in HBM), Pallas vs XLA (popcount + lax.top_k);
- ``attention``: sparse_decode_attention over k = keep_ratio * S selected rows, Pallas vs XLA;
- ``spotlight``: both together, vs the dense decode baselines (cuDNN ``dot_product_attention`` and
  ``pallas.ops.gpu.decode_attention.gqa``) at the ``--dense-lengths``.

Achieved bandwidth counts the minimal bytes (codes read once + indices written; selected K/V rows
read once) against ``--peak-tbs`` (3.0 TB/s measured on the H100, device-to-device copy). Results:
``<--out-dir>/<--name>.json`` and its table (``.md``); default a new runs/bench/kernels-<time>/kernels_<device>.json.
"""

# ruff: noqa: B023 - the timed lambdas are called inside the loop iteration that defines them
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from spotlight_jax.bench.common import profile_kernels, run_folder
from spotlight_jax.cli import option, out_dir_field, preset_field, preset_name

MODELS = {  # name (as ModelConfig.preset's, plus a tensor-parallel slice): (query heads N, KV heads K, head_dim H)
    "qwen2.5-7b": (28, 4, 128),
    "llama3-8b": (32, 8, 128),
    "qwen2.5-7b-tp2": (14, 2, 128),  # one GPU's heads under 2-way tensor parallelism
}
L2_BYTES = 50 * 2**20


@dataclasses.dataclass(frozen=True)
class KernelsConfig:
    model: tuple[str, ...] = preset_field(
        tuple(MODELS), tuple(MODELS), "one or several", nargs="+", aliases=("models",)
    )
    batch: tuple[int, ...] = option((1, 8), "batch sizes", aliases=("batches",))
    context: tuple[int, ...] = option((32768, 131072, 524288, 1048576), "cache lengths", aliases=("lengths",))
    dense_context: tuple[int, ...] = option((131072,), "cache lengths where the dense baselines run",
                                            aliases=("dense-lengths",))  # fmt: skip
    bits: int = option(128, "code bits")
    keep_ratio: float = option(0.02, "share of the cache selected")
    ops: tuple[str, ...] = option(("topk", "attention", "spotlight"), "what to time",
                                  choices=("topk", "attention", "spotlight", "prologue"))  # fmt: skip
    repeats: int = option(9, "timed repetitions (median reported)", aliases=("reps",))
    xla: bool = option(True, "also time the XLA references")
    xla_max_length: int = option(1 << 20, "longest cache the XLA references run at")
    max_kv_gb: float = option(20.0, "skip attention above this KV size")
    peak_tbs: float = option(3.0, "bandwidth (TB/s) the achieved rates are read against")
    topk_variants: tuple[str, ...] = option(
        (), "extra hamming_topk settings, each 'block_s:T[:num_warps[:csa]]' (csa 1 | 0 | f<N>) or keyed "
        "'bs=1024,T=32,w=8,mb=128,d1=2,d=2,one=1' (mb max_blocks, P target_programs, d1 / d pass-1 / later-pass "
        "depth, one=1: all passes in one launch); the old ';'-separated form works too (default: none)", sep=";",
    )  # fmt: skip
    attention_combines: tuple[str, ...] = option(("kernel",), "split-k merges to compare",
                                                 choices=("atomic", "kernel", "xla"))  # fmt: skip
    attention_chunks: tuple[int, ...] = option(
        (0,), "selected slots per attention program to compare, e.g. 0 64 128 (0: the kernel's default_chunk)"
    )
    attention_variants: tuple[str, ...] = option(
        (), "extra sparse_decode_attention_rows settings, each keyed 'bt=64,w=8,st=3,hb=32' (bt block_t: slots per "
        "step, w num_warps, st num_stages, hb merge_block_h: head_dim columns per merge program); the old "
        "';'-separated form works too (default: none)", sep=";",
    )  # fmt: skip
    profile: bool = option(
        True, "also report device time per call (profiler): at batch 1 the wall time per call is bound by the host's "
        "launch rate (~9-10 us above the kernels), the device time is what a decode step pays",
    )  # fmt: skip
    table: tuple[str, ...] | None = option(None, "only print the table of earlier runs' JSON files (default: off)",
                                           nargs="+", metavar="JSON", sep=None)  # fmt: skip
    name: str | None = option(None, "stem of the result files (default: kernels_<device>)")
    out_dir: str | None = out_dir_field("bench")


CONFIG = KernelsConfig


PROFILE = False
LAST_PROFILE = None  # (device us per call, {kernel: us per call}) of the last profiled timing


TOPK_KEYS = {  # short name in a --topk-variants spec -> hamming_topk_rows keyword
    "bs": "block_s",
    "T": "num_thresholds",
    "w": "num_warps",
    "csa": "csa",
    "fa": "csa_full_adders",
    "mb": "max_blocks",
    "P": "target_programs",
    "d1": "pass1_depth",
    "d": "depth",
    "one": "one_launch",
}
TOPK_DEFAULT = {"block_s": 1024, "num_thresholds": 32, "num_warps": 8}  # keyed variants' base: the plain grid
ATTENTION_KEYS = {"bt": "block_t", "w": "num_warps", "st": "num_stages", "hb": "merge_block_h"}


def _attention_variant(spec: str) -> dict:
    """sparse_decode_attention_rows keywords from a keyed spec 'bt=64,w=8,st=3,hb=32' (see ``ATTENTION_KEYS``)."""
    kw = {}
    for item in spec.split(","):
        key, _, val = item.partition("=")
        if key not in ATTENTION_KEYS or not val.isdigit():
            raise ValueError(f"bad attention variant item {item!r} in {spec!r}; keys: {', '.join(ATTENTION_KEYS)}")
        kw[ATTENTION_KEYS[key]] = int(val)
    return kw


def _topk_variant(spec: str) -> dict:
    """A hamming_topk_rows setting: 'block_s:T[:num_warps[:csa]]' (csa '1', '0' or 'f<N>' = <= N full adders) or
    keyed 'bs=1024,T=32,w=8,csa=1,fa=4,mb=128,d1=2,d=2' (mb: max_blocks, P: target programs, d1 / d: pass-1 /
    later-pass depth, one: 1 = all passes in one kernel launch)."""
    if "=" in spec:
        kw = dict(TOPK_DEFAULT)
        for item in spec.split(","):
            key, val = item.split("=")
            if key not in TOPK_KEYS:
                raise ValueError(f"unknown top-k variant key {key!r} in {spec!r}; known: {', '.join(TOPK_KEYS)}")
            kw[TOPK_KEYS[key]] = bool(int(val)) if key in ("csa", "one") else int(val)
        return kw
    bs, t, *rest = spec.split(":")
    kw = {"block_s": int(bs), "num_thresholds": int(t), "num_warps": int(rest[0]) if rest else 8}
    c = rest[1] if len(rest) > 1 else "1"
    if c.startswith("f"):
        kw["csa_full_adders"] = int(c[1:])
    elif c == "0":
        kw["csa"] = False
    return kw


def _variant_name(kw: dict, keys: dict = TOPK_KEYS) -> str:
    """'key=value,...' of a variant's keywords in the short names of ``keys`` (TOPK_KEYS or ATTENTION_KEYS)."""
    short = {v: k for k, v in keys.items()}
    return ",".join(f"{short[k]}={int(v)}" for k, v in kw.items())


def _median_call_us(fn, arg_sets, reps: int, label: str = "", min_calls: int = 64, carry=None) -> float:
    """Wall time per call of ``fn``: the slope of (median wall time of one jit) over the number of calls in it.

    One jit runs ``len(arg_sets)`` calls (round 0), another ``rounds`` times as many distinct calls: in round r the
    first argument of call j comes from set j and the others from set (j + r) % n, so consecutive calls still rotate
    through all inputs (nothing stays in L2) and no two calls are equal (nothing for XLA to merge). The slope between
    the two removes the jit's fixed dispatch cost (~0.1 ms with dozens of array arguments) and keeps what a decode
    step pays per call: the kernels plus the launch gaps between them.

    With ``carry`` (e.g. caches that the op updates in place), ``fn(carry, *args) -> (out, carry)`` and the calls of
    one jit are chained through it, as decode steps are: only the jit's first call copies the (not donated) carry, a
    fixed cost that the slope removes.
    """
    n = len(arg_sets)
    rounds = min(n, max(2, math.ceil(min_calls / n)))
    calls = [
        (arg_sets[j][0], *arg_sets[(j + r) % n][1:]) for r in range(rounds) for j in range(n)
    ]  # fmt: skip
    if carry is None:
        many = jax.jit(lambda sets: [fn(*a) for a in sets])
    else:

        def chained(sets, c):
            outs = []
            for a in sets:
                out, c = fn(c, *a)
                outs.append(out)
            return outs, c

        many = functools.partial(jax.jit(chained), c=carry)
    jax.block_until_ready(many(calls[:n]))  # compile + warm up
    jax.block_until_ready(many(calls))
    global LAST_PROFILE
    LAST_PROFILE = None
    if PROFILE and label:
        try:
            LAST_PROFILE = profile_kernels(lambda: many(calls[:n]), label, per=n)
        except Exception as e:  # noqa: BLE001 - profiling is best effort
            print(f"    profile failed: {type(e).__name__}: {str(e)[:200]}")
        if carry is not None and LAST_PROFILE is not None:
            LAST_PROFILE = _without_carry_copy(*LAST_PROFILE)

    def wall(sets):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(many(sets))
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    short, full = wall(calls[:n]), wall(calls)
    print(f"    {label or 'call'}: {n} calls {short * 1e6:.0f} us, {len(calls)} calls {full * 1e6:.0f} us", flush=True)
    return (full - short) / (len(calls) - n) * 1e6


def _copies(nbytes: int, cap: int = 32) -> int:
    return int(min(cap, max(2, math.ceil(4 * L2_BYTES / max(nbytes, 1)))))


def _rand_codes(key, shape):
    return jax.random.bits(key, shape, jnp.uint32)


def _kv_cache(key, b, kv, s, h, dtype=jnp.bfloat16):
    """Random-looking cache without a full-size fp32 temporary: tile a random 4096-row slab."""
    rows = min(s, 4096)
    slab = jax.random.normal(key, (b, kv, rows, h), jnp.float32).astype(dtype)
    return jnp.tile(slab, (1, 1, math.ceil(s / rows), 1))[:, :, :s]


def _without_carry_copy(total: float, kernels: dict) -> tuple[float, dict]:
    """Device time without the copy of a chained carry (``MemcpyD2D``: the jit's first call copies the caches it was
    given, once per profiled jit: a cost of the harness, not of a decode step, which updates its caches in place)."""
    copies = {k: v for k, v in kernels.items() if k.startswith("Memcpy")}
    if copies:
        print(f"    (device time without the carry's copy: -{sum(copies.values()):.1f} us per call)")
    return total - sum(copies.values()), {k: v for k, v in kernels.items() if k not in copies}


def _row(res, name, us, nbytes, peak, **extra):
    r = dict(op=name, us=round(us, 2), bytes=int(nbytes), tbs=round(nbytes / us * 1e-6, 3))
    r["frac_peak"] = round(r["tbs"] / peak, 3)
    if LAST_PROFILE is not None:
        r["device_us"] = round(LAST_PROFILE[0], 2)
        r["device_tbs"] = round(nbytes / max(LAST_PROFILE[0], 1e-9) * 1e-6, 3)
        r["kernels_us"] = LAST_PROFILE[1]
    r.update(extra)
    res.append(r)
    dev_s = f"  device {r['device_us']:8.1f} us {r['device_tbs']:5.2f} TB/s" if "device_us" in r else ""
    print(f"    {name:34s} {us:10.1f} us  {r['tbs']:6.2f} TB/s  {r['frac_peak']:5.2f} of peak{dev_s}", flush=True)
    return r


def _cell(r: dict | None, target: bool = False) -> str:
    """'wall (device) [target]' in us, '' without a row."""
    if r is None:
        return ""
    out = f"{r['us']:.1f}" + (f" ({r['device_us']:.1f})" if "device_us" in r else "")
    return out + (f" [{r['target_us']:.1f}]" if target and "target_us" in r else "")


def markdown_table(meta: dict, results: list[dict]) -> str:
    """The run as one table: a row per (shape, batch, length); our kernels vs the XLA references and dense attention.

    Cells are wall us per call (the slope over calls: kernels + launch gaps) with the profiler's device us in
    parentheses and the issue's target in brackets.
    """
    configs = list(dict.fromkeys((r["model"], r["batch"], r["length"]) for r in results))
    head = (
        "| shape | B | N | `hamming_topk` [target] | XLA popcount + `lax.top_k` | sparse attention [target] | "
        "XLA gather + softmax | top-k + attention | dense cuDNN | dense ours | cuDNN ÷ top-k + attention |"
    )
    lines = [
        f"{meta.get('device', '?')}, jax {meta.get('jax', '?')}, {meta.get('date', '?')}; us per call: wall (device)",
        "",
        head,
        "|---|---:|---:|" + "---:|" * 8,
    ]
    for model, b, n in configs:
        rows = [r for r in results if (r["model"], r["batch"], r["length"]) == (model, b, n)]

        def get(prefix, rows=rows):
            return next((r for r in rows if r["op"] == prefix or r["op"].startswith(prefix + "(")), None)

        topk, both, cudnn = get("topk_pallas"), get("spotlight_pallas"), get("dense_cudnn")
        ratio = ""
        if both and cudnn:
            ratio = f"{cudnn['us'] / both['us']:.1f}×"
            if "device_us" in both and "device_us" in cudnn:
                ratio += f" ({cudnn['device_us'] / both['device_us']:.1f}×)"
        size = f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K"
        cells = [
            model, str(b), size, _cell(topk, True), _cell(get("topk_xla")), _cell(get("attention_pallas"), True),
            _cell(get("attention_xla")), _cell(both), _cell(cudnn), _cell(get("dense_pallas_ours")), ratio,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _save(path: str, meta: dict, results: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(markdown_table(meta, results))


def _bench_prologue(results, cache, qs, key, cfg, opts: KernelsConfig):
    """The decode step's prologue of one sparse layer (RoPE, hash MLP, packing, K / V / code writes at a position):
    the fused Pallas kernel vs the unfused XLA ops (its reference), caches chained through the calls in place."""
    from pallas_kernels import decode_prologue
    from pallas_kernels.decode_prologue import rope_tables
    from pallas_kernels.hash_mlp import HashMLP

    b, n, h = qs[0].shape
    kv, s = cache[0].shape[1:3]
    w, calls = opts.bits // 32, len(qs)
    ks = jax.random.split(key, 6)
    dims = (h, 128, opts.bits)
    shapes = [(kv, a, c) for a, c in zip(dims[:-1], dims[1:], strict=True)]
    weights = tuple(jax.random.normal(jax.random.fold_in(ks[0], i), x) * x[1] ** -0.5 for i, x in enumerate(shapes))
    mlp = HashMLP(weights, tuple(jnp.zeros((kv, x[2])) for x in shapes))
    inv_freq = 1.0 / (1e6 ** (jnp.arange(0, h, 2) / h))
    sets = []
    for i in range(calls):
        kk, vk, pk = jax.random.split(jax.random.fold_in(ks[2], i), 3)
        pos = jax.random.randint(pk, (b,), 0, s)
        sets.append((qs[i], jax.random.normal(kk, (b, kv, h), jnp.bfloat16),
                     jax.random.normal(vk, (b, kv, h), jnp.bfloat16), *rope_tables(pos, inv_freq), pos))  # fmt: skip
    code_cache = _rand_codes(ks[3], (b, kv, s, w))
    nbytes = 2 * (2 * b * n * h * 2 + 2 * b * kv * h * 2) + b * (n + kv) * w * 4  # q in / out, k, v, codes
    for impl in ("pallas", "xla") if opts.xla else ("pallas",):
        fn = lambda c, q, k, v, cos, sin, pos, impl=impl: (
            lambda p: ((p.q, p.q_codes), (p.k_cache, p.v_cache, p.code_cache))
        )(decode_prologue(q, k, v, cos, sin, pos, *c, mlp, implementation=impl))
        us = _median_call_us(fn, sets, opts.repeats, f"prologue {impl}", carry=(*cache, code_cache))
        _row(results, f"prologue_{impl}", us, nbytes, opts.peak_tbs, **cfg)


def run(opts: KernelsConfig) -> dict:
    if opts.table:
        for path in opts.table:
            with open(path) as f:
                run_ = json.load(f)
            print(markdown_table(run_["meta"], run_["results"]))
        return {}
    # Every setting is checked before any work (and before the results folder exists).
    models = [preset_name(m, tuple(MODELS)) for m in opts.model]
    ops = set(opts.ops)
    variants = [_topk_variant(v) for v in opts.topk_variants if v]
    dense_lengths = set(opts.dense_context)
    combines = list(opts.attention_combines)
    chunks = list(opts.attention_chunks)
    att_variants = [{}] + [_attention_variant(v) for v in opts.attention_variants if v]
    from pallas_kernels import hamming_topk_reference, sparse_decode_attention_reference
    from pallas_kernels.hamming_topk import default_grid, hamming_topk_rows, hamming_topk_rows_stats
    from pallas_kernels.sparse_decode_attention import sparse_decode_attention_rows

    global PROFILE
    PROFILE = opts.profile
    dev = jax.devices()[0]
    peak = opts.peak_tbs
    meta = dict(
        device=f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
        jax=jax.__version__,
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        peak_tbs=peak,
        timing="us: slope of median wall time of one jit over its number of distinct calls (N and R*N calls, rotating "
        "inputs; removes the fixed dispatch cost, keeps kernels + launch gaps); "
        "device_us: sum of kernel durations per call from a profiler trace (no launch gaps)",
    )
    stem = opts.name or f"kernels_{meta['device'].split(':')[-1].replace(' ', '_') or 'cpu'}"
    path = os.path.join(run_folder("bench", "kernels", opts.out_dir), stem + ".json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    results = []
    key = jax.random.PRNGKey(0)
    w = opts.bits // 32
    for model in models:
        n, kv, h = MODELS[model]
        for b in opts.batch:
            for s in opts.context:
                k = max(1, math.ceil(opts.keep_ratio * s))
                cfg = dict(model=model, batch=b, length=s, k=k, bits=opts.bits)
                print(f"== {model} B={b} S={s} k={k}", flush=True)
                code_bytes = b * kv * s * w * 4
                ncodes = _copies(code_bytes)
                calls = max(ncodes, 8)
                keys = jax.random.split(jax.random.fold_in(key, s * 131 + b), 8)
                lengths = jnp.full((b,), s, jnp.int32)
                budget = jnp.full((b,), k, jnp.int32)
                codes = [_rand_codes(jax.random.fold_in(keys[0], i), (b, kv, s, w)) for i in range(ncodes)]
                qcodes = [_rand_codes(jax.random.fold_in(keys[1], i), (b, n, w)) for i in range(calls)]
                topk_sets = [(qcodes[i], codes[i % ncodes], lengths, budget) for i in range(calls)]
                topk_bytes = code_bytes + b * kv * k * 4
                if "topk" in ops or "spotlight" in ops:
                    bs, nw = default_grid(s, b * kv)  # the default row names the grid that the rule picks
                    for kw in [{**TOPK_DEFAULT, "block_s": bs, "num_warps": nw}] + variants:
                        fn = lambda q, c, ln, bu, kw=kw: hamming_topk_rows(q, c, ln, bu, k=k, **kw)[0]
                        name = _variant_name(kw)
                        try:
                            stalls = int(hamming_topk_rows_stats(*topk_sets[0], k=k, **kw)[3])
                            if stalls:  # the one-launch kernel gave up waiting: its result is wrong
                                print(f"    topk {name}: {stalls} stalled waits (wrong result); skipped")
                                continue
                            us = _median_call_us(fn, topk_sets, opts.repeats, f"topk {name}")
                        except Exception as e:  # noqa: BLE001 - report, keep benchmarking
                            print(f"    topk {name} failed: {type(e).__name__}: {str(e)[:300]}")
                            continue
                        _row(
                            results,
                            f"topk_pallas({name})",
                            us,
                            topk_bytes,
                            peak,
                            **cfg,
                            target_us=round(max(8.0, 1.5 * code_bytes / (peak * 1e6)), 2),
                        )
                    if opts.xla and s <= opts.xla_max_length:
                        fn = lambda q, c, ln, bu: hamming_topk_reference(q, c, ln, k, bu).indices
                        us = _median_call_us(
                            fn, topk_sets[: max(2, min(calls, 8))], max(3, opts.repeats // 2), "topk xla"
                        )
                        _row(results, "topk_xla(popcount+lax.top_k)", us, topk_bytes, peak, **cfg)
                del topk_sets
                kv_bytes = 2 * b * kv * s * h * 2
                if kv_bytes > opts.max_kv_gb * 1e9 or not ({"attention", "spotlight", "prologue"} & ops):
                    codes.clear()
                    continue
                ncache = _copies(kv_bytes, cap=4)
                caches = [
                    (
                        _kv_cache(jax.random.fold_in(keys[2], i), b, kv, s, h),
                        _kv_cache(jax.random.fold_in(keys[3], i), b, kv, s, h),
                    )
                    for i in range(ncache)
                ]
                qs = [jax.random.normal(jax.random.fold_in(keys[4], i), (b, n, h), jnp.bfloat16) for i in range(calls)]
                sel_bytes = 2 * b * kv * k * h * 2 + b * kv * k * 4
                if "attention" in ops:
                    rng = np.random.default_rng(s + b)
                    idx_sets = [
                        jnp.asarray(np.sort(rng.integers(0, s, (b * kv, k)), axis=-1).astype(np.int32))
                        for _ in range(calls)
                    ]
                    nvalid = jnp.full((b * kv,), k, jnp.int32)
                    att_sets = [(qs[i], *caches[i % ncache], idx_sets[i], nvalid) for i in range(calls)]
                    for comb, chunk, kw in [(c, ch, kw) for c in combines for ch in chunks for kw in att_variants]:
                        fn = lambda q, kc, vc, ix, nv, comb=comb, chunk=chunk, kw=kw: sparse_decode_attention_rows(
                            q, kc, vc, ix, nv, combine=comb, chunk=chunk or None, **kw
                        )
                        mods = ([] if comb == "kernel" else [f"combine={comb}"]) + ([f"chunk={chunk}"] if chunk else [])
                        mods += [_variant_name(kw, ATTENTION_KEYS)] if kw else []
                        us = _median_call_us(fn, att_sets, opts.repeats, f"attention {','.join(mods) or 'default'}")
                        _row(
                            results,
                            "attention_pallas" + (f"({','.join(mods)})" if mods else ""),
                            us,
                            sel_bytes,
                            peak,
                            **cfg,
                            target_us=round(max(8.0, 1.5 * 2 * b * kv * k * h * 2 / (peak * 1e6)), 2),
                        )
                    if opts.xla and s <= opts.xla_max_length:
                        valid = jnp.ones((b, kv, k), bool)
                        fn = lambda q, kc, vc, ix: sparse_decode_attention_reference(
                            q, kc, vc, ix.reshape(b, kv, k), valid
                        )
                        us = _median_call_us(fn, [a[:4] for a in att_sets], opts.repeats, "attention xla")
                        _row(results, "attention_xla(gather+softmax)", us, sel_bytes, peak, **cfg)
                    del att_sets, idx_sets
                if "spotlight" in ops:
                    from pallas_kernels import spotlight_attention

                    sp_sets = [
                        (qs[i], *caches[i % ncache], qcodes[i], codes[i % ncodes], lengths, budget)
                        for i in range(calls)
                    ]
                    fn = lambda q, kc, vc, qc, cc, ln, bu: spotlight_attention(
                        q, kc, vc, qc, cc, ln, k, bu, implementation="pallas"
                    )
                    us = _median_call_us(fn, sp_sets, opts.repeats, "spotlight")
                    _row(results, "spotlight_pallas(topk+attention)", us, topk_bytes + sel_bytes, peak, **cfg)
                    if s in dense_lengths:
                        dense_bytes = kv_bytes
                        from pallas_kernels import decode_attention

                        # Ours: flash-decoding over the [B, K, S, H] cache generate() keeps (no transpose).
                        own_sets = [(qs[i], *caches[i % ncache], lengths) for i in range(calls)]
                        for comb in combines:
                            fn = lambda q, kc, vc, ln, comb=comb: decode_attention(
                                q, kc, vc, ln, implementation="pallas", combine=comb
                            )
                            us = _median_call_us(fn, own_sets, opts.repeats, f"dense ours {comb}")
                            label = "dense_pallas_ours" + ("" if comb == "kernel" else f"(combine={comb})")
                            _row(results, label, us, dense_bytes, peak, **cfg)
                        del own_sets
                        # Dense baselines read the whole cache in [B, S, K, H] layout.
                        tcaches = [(kc.transpose(0, 2, 1, 3), vc.transpose(0, 2, 1, 3)) for kc, vc in caches]
                        dn_sets = [(qs[i], *tcaches[i % ncache]) for i in range(calls)]
                        try:
                            fn = lambda q, kc, vc: jax.nn.dot_product_attention(
                                q[:, None], kc, vc, implementation="cudnn"
                            )
                            us = _median_call_us(fn, dn_sets, opts.repeats, "cudnn")
                            _row(results, "dense_cudnn", us, dense_bytes, peak, **cfg)
                        except Exception as e:  # noqa: BLE001 - report, keep benchmarking
                            print(f"    dense_cudnn failed: {type(e).__name__}: {str(e)[:200]}")
                        try:
                            from jax.experimental.pallas.ops.gpu import decode_attention

                            fn = lambda q, kc, vc: decode_attention.gqa(q, kc, vc)
                            us = _median_call_us(fn, dn_sets, opts.repeats, "gqa")
                            _row(results, "dense_pallas_gqa", us, dense_bytes, peak, **cfg)
                        except Exception as e:  # noqa: BLE001
                            print(f"    dense_pallas_gqa failed: {type(e).__name__}: {str(e)[:200]}")
                        del tcaches, dn_sets
                    del sp_sets
                if "prologue" in ops:
                    _bench_prologue(results, caches[0], qs, keys[5], cfg, opts)
                del caches, codes
                _save(path, meta, results)  # after every configuration: a timeout keeps what ran
    _save(path, meta, results)
    print(markdown_table(meta, results))
    print(f"wrote {path} and its table ({os.path.splitext(path)[0]}.md)")
    return dict(meta=meta, results=results)
