"""``python -m spotlight_jax.bench attention``: prefill flash attention, ours (Pallas) vs cuDNN vs the blocked XLA loop.

Shapes: the Qwen2.5-7B attention (``--heads N:K:H`` = 28:4:128, bf16) over caches of ``--context`` S keys. Two cases:

- ``chunk``: the attention of the LAST chunk of a causal prefill: T = ``--chunk`` queries at positions S - T .. S - 1
  against all S keys (bottom-right aligned causal mask), the most expensive chunk of a chunked prefill;
- ``full`` (``--full``): the whole causal self-attention, T = S queries at offset 0.

FLOPs count the visible query-key pairs only: 4 * B * N * H * pairs (two dots), pairs = T * (S - T) + T * (T + 1) / 2.
The ``gemm`` row is the bf16 rate of an n x n x n matmul (``--gemm-size``) measured in the same run, the ceiling to
read the attention TFLOP/s against.

cuDNN is ``jax.nn.dot_product_attention(..., implementation="cudnn")`` in its [B, T, N, H] layout (transposes are made
outside the timed region). Its ``is_causal`` mask is top-left aligned: exact for ``full``, wrong for a chunk at the end
of the cache, and jax's API (0.10.2; MaskType NO_MASK / PADDING / CAUSAL / PADDING_CAUSAL / ALIBI) has no
bottom-right causal mask. So the ``chunk`` case runs cuDNN as two calls whose union is exactly the bottom-right mask:
the T queries against the S - T prefix keys without a mask, and against the chunk's own T keys with ``is_causal``
(queries and keys then start at the same position, so top-left alignment is right), merged by their log-sum-exps
(``return_residual``; jax hands the LSE back in the output dtype, bf16, so the merge itself is only bf16-accurate:
``--check`` shows it). The prefix / chunk slices of the cache are made outside the timed region too.

Timing: one jitted program runs ``--iters`` calls in a ``lax.fori_loop``; every call's inputs pass through an
``optimization_barrier`` with the previous call's output, so no call can be hoisted, merged or overlapped with the
next, and the program returns the last output (nothing is dead). Per call = median wall time of ``--repeats`` runs /
iters (dispatch is amortised). Results: ``<--out-dir>/<--name>.{json,md}`` (default: runs/bench/attention-<time>/).

CPU smoke run (interpret mode, tiny shapes): ``--impls xla pallas --interpret --context 256 --chunk 64 --heads 4:2:32
--gemm-size 128 --iters 1 --repeats 1``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spotlight_jax.bench.common import median, run_folder, time_jitted, write_results
from spotlight_jax.cli import option, out_dir_field

IMPLS = ("pallas", "cudnn", "xla")
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
CUDNN_CHUNK_NOTE = "prefix (no mask) + chunk (is_causal) calls, LSE merge: jax's cuDNN API has no bottom-right mask"


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    context: tuple[int, ...] = option((32768, 131072), "S: keys in the cache")
    chunk: tuple[int, ...] = option((4096, 8192), "T: queries of the last prefill chunk")
    batch: tuple[int, ...] = option((1,), "batch sizes")
    heads: str = option("28:4:128", "N:K:H query heads, KV heads, head_dim (Qwen2.5-7B)")
    dtype: str = option("bfloat16", "dtype of q, k, v", choices=sorted(DTYPES))
    impls: tuple[str, ...] = option(IMPLS, "implementations to time", choices=IMPLS)
    full: bool = option(False, "also the whole causal self-attention (T = S, offset 0)")
    tilings: tuple[str, ...] = option(
        (), "extra Pallas tilings block_q:block_k:num_warps:num_stages besides the default, e.g. 128:64:8:3 "
        "(block_q / block_k are capped at next_pow2(T) / next_pow2(S); default: none)", metavar="BQ:BK:W:ST",
    )  # fmt: skip
    repeats: int = option(5, "timed runs of each program (median reported)")
    iters: int = option(0, "calls per timed program (0: about 0.3 s of work per run)")
    xla_block_k: int = option(512, "key block of the XLA loop")
    xla_max_gb: float = option(2.0, "skip the XLA loop when one step's fp32 scores exceed this")
    gemm_size: int = option(8192, "n of the bf16 n x n x n GEMM rate row (0: none)")
    interpret: bool = option(False, "Pallas kernel in interpret mode (CPU smoke runs)")
    check: bool = option(False, "first compare ours vs cuDNN (and XLA) on a small shape")
    check_context: int = option(2048, "S of the --check shape (T = S / 4 and T = S)")
    name: str = option("prefill_attention", "stem of the result files")
    out_dir: str | None = out_dir_field("bench")


CONFIG = AttentionConfig


def parse_heads(spec: str) -> tuple[int, int, int]:
    try:
        n, k, h = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"heads must be N:K:H, got {spec!r}") from None
    if n % k:
        raise ValueError(f"heads {spec}: N={n} is not a multiple of K={k}")
    return n, k, h


def parse_tiling(spec: str) -> dict:
    try:
        bq, bk, w, st = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"tilings are block_q:block_k:num_warps:num_stages, got {spec!r}") from None
    return dict(block_q=bq, block_k=bk, num_warps=w, num_stages=st)


def visible_pairs(t: int, s: int) -> int:
    """Query-key pairs of T queries at positions S - T .. S - 1 under the causal mask."""
    return t * (s - t) + t * (t + 1) // 2


def attention_flops(b: int, n: int, h: int, t: int, s: int) -> float:
    return 4.0 * b * n * h * visible_pairs(t, s)


def per_call_seconds(call, args, iters: int, repeats: int) -> float:
    """Median wall seconds per ``call(*args)`` over a jitted fori_loop of ``iters`` chained calls (module docstring)."""
    out = jax.eval_shape(call, *args)

    @jax.jit
    def program(*a):
        def body(_, prev):
            a_i, _ = lax.optimization_barrier((a, prev))  # a depends on the previous call: no hoisting, no CSE
            return call(*a_i)

        return lax.fori_loop(0, iters, body, jnp.zeros(out.shape, out.dtype))

    return median(time_jitted(program, *args, repeats=repeats, warmup=1)) / iters


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _rand(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _cudnn_calls(scale: float, t: int, s: int):
    """(call, make_args) of cuDNN for T queries at the end of S keys; make_args(q, k, v) -> the [B, T, N, H] /
    [B, S, K, H] inputs of the call (made outside the timed region)."""
    dpa = jax.nn.dot_product_attention
    to_btnh = lambda x: x.transpose(0, 2, 1, 3)
    if t == s:

        def call(qt, kt, vt):
            return dpa(qt, kt, vt, scale=scale, is_causal=True, implementation="cudnn")

        return call, lambda q, k, v: (to_btnh(q), to_btnh(k), to_btnh(v))

    def merged(qt, kp, vp, kc, vc):
        o1, r1 = dpa(qt, kp, vp, scale=scale, implementation="cudnn", return_residual=True)
        o2, r2 = dpa(qt, kc, vc, scale=scale, is_causal=True, implementation="cudnn", return_residual=True)
        r1, r2 = r1.astype(jnp.float32), r2.astype(jnp.float32)  # [B, T, N] log-sum-exps
        m = jnp.maximum(r1, r2)
        w1, w2 = jnp.exp(r1 - m)[..., None], jnp.exp(r2 - m)[..., None]
        return ((o1.astype(jnp.float32) * w1 + o2.astype(jnp.float32) * w2) / (w1 + w2)).astype(qt.dtype)

    def make(q, k, v):
        kt, vt = to_btnh(k), to_btnh(v)
        return to_btnh(q), kt[:, : s - t], vt[:, : s - t], kt[:, s - t :], vt[:, s - t :]

    return merged, make


def _impl_calls(opts: AttentionConfig, impl: str, scale: float, t: int, s: int, h: int, tilings: list[dict]):
    """[(label, note, call, make_args)] of one implementation; make_args(q, k, v, offset, lengths) -> call's args."""
    from pallas_kernels import flash_attention
    from pallas_kernels.flash_attention import default_tiling

    ours_args = lambda q, k, v, off, ln: (q, k, v, off, ln)
    if impl == "pallas":
        out = []
        for kw in [{}, *tilings]:
            call = lambda q, k, v, off, ln, kw=kw: flash_attention(
                q, k, v, off, ln, scale=scale, implementation="pallas", interpret=opts.interpret, **kw
            )
            bq, bk, w, st = tuple(kw.values()) or default_tiling(h, jnp.dtype(DTYPES[opts.dtype]).itemsize)
            out.append(("pallas", f"{bq}:{bk}:{w}:{st}" + ("" if kw else " (default)"), call, ours_args))
        return out
    if impl == "xla":
        call = lambda q, k, v, off, ln: flash_attention(
            q, k, v, off, ln, scale=scale, implementation="xla", block_k=opts.xla_block_k
        )
        return [("xla", f"block_k={opts.xla_block_k}", call, ours_args)]
    call, make = _cudnn_calls(scale, t, s)
    return [("cudnn", "" if t == s else CUDNN_CHUNK_NOTE, call, lambda q, k, v, off, ln: make(q, k, v))]


def gemm_row(n: int, repeats: int, iters: int) -> dict:
    x = _rand(jax.random.key(7), (n, n), jnp.bfloat16)
    y = _rand(jax.random.key(8), (n, n), jnp.bfloat16)
    flops = 2.0 * n**3
    iters = iters or _auto_iters(flops)
    sec = per_call_seconds(jnp.matmul, (x, y), iters, repeats)
    blank = dict.fromkeys(("batch", "context", "chunk", "offset"), "")
    return dict(case="gemm", **blank, impl="xla dot", note=f"bf16 [{n}, {n}] x [{n}, {n}]", ms=round(sec * 1e3, 4),
                tflops=round(flops / sec / 1e12, 2))  # fmt: skip


def _auto_iters(flops: float) -> int:
    rate = 400e12 if jax.default_backend() == "gpu" else 20e9
    return int(min(50, max(1, 0.3 * rate / flops)))


def _skip_reason(impl: str, opts: AttentionConfig, b: int, n: int, t: int, on_gpu: bool) -> str | None:
    if impl == "cudnn" and not on_gpu:
        return "cudnn needs a GPU"
    if impl == "pallas" and not on_gpu and not opts.interpret:
        return "pallas needs a GPU or --interpret"
    if impl == "xla" and b * n * t * opts.xla_block_k * 4 > opts.xla_max_gb * 1e9:
        return f"xla: one step's scores exceed --xla-max-gb {opts.xla_max_gb}"
    return None


def run_check(opts: AttentionConfig, n: int, kv: int, h: int, dtype, on_gpu: bool) -> list[dict]:
    """Ours vs cuDNN vs XLA vs the fp32 reference on a small shape, for a last chunk (T = S / 4) and T = S."""
    from pallas_kernels import flash_attention, flash_attention_reference

    s = opts.check_context
    scale = 1.0 / math.sqrt(h)
    keys = jax.random.split(jax.random.key(1), 3)
    k, v = (_rand(kk, (1, kv, s, h), dtype) for kk in keys[:2])
    lengths = jnp.full((1,), s, jnp.int32)
    out = []
    for t in (s // 4, s):
        q = _rand(keys[2], (1, n, t, h), dtype)
        off = jnp.int32(s - t)
        ref = np.asarray(flash_attention_reference(q, k, v, off, lengths, scale=scale))
        got = {}
        if on_gpu or opts.interpret:
            got["pallas"] = flash_attention(
                q, k, v, off, lengths, scale=scale, implementation="pallas", interpret=opts.interpret
            )
        got["xla"] = flash_attention(q, k, v, off, lengths, scale=scale, implementation="xla")
        if on_gpu:
            call, make = _cudnn_calls(scale, t, s)
            got["cudnn"] = call(*make(q, k, v)).transpose(0, 2, 1, 3)
        got = {name: np.asarray(x, np.float32) for name, x in got.items()}
        row = dict(check=f"S={s} T={t}", **{f"{name}_vs_ref": float(np.abs(x - ref).max()) for name, x in got.items()})
        if "pallas" in got and "cudnn" in got:
            row["pallas_vs_cudnn"] = float(np.abs(got["pallas"] - got["cudnn"]).max())
        print("  check (max abs error):", {a: f"{b:.2e}" if isinstance(b, float) else b for a, b in row.items()})
        out.append(row)
    if not on_gpu:
        print("  check: no GPU, so no cuDNN; ours and XLA compared with the fp32 reference only")
    return out


def run(opts: AttentionConfig) -> list[dict]:
    n, kv, h = parse_heads(opts.heads)
    dtype = DTYPES[opts.dtype]
    tilings = [parse_tiling(x) for x in opts.tilings]
    on_gpu = jax.default_backend() == "gpu"
    scale = 1.0 / math.sqrt(h)
    meta = dict(
        heads=dict(N=n, K=kv, H=h),
        dtype=opts.dtype,
        flops="4 * B * N * H * visible query-key pairs (causal)",
        timing="median wall time of --repeats runs of one jitted fori_loop of --iters chained calls, per call",
        cudnn_chunk=CUDNN_CHUNK_NOTE,
        interpret=opts.interpret,
    )
    if opts.check:
        meta["check"] = run_check(opts, n, kv, h, dtype, on_gpu)
    rows: list[dict] = []
    if opts.gemm_size:
        rows.append(gemm_row(opts.gemm_size, opts.repeats, opts.iters))
        print(f"  gemm {opts.gemm_size}: {rows[-1]['ms']:.3f} ms {rows[-1]['tflops']} TFLOP/s", flush=True)
    key = jax.random.key(0)
    for b in opts.batch:
        for s in opts.context:
            kk, kv_key, kq = jax.random.split(jax.random.fold_in(key, s * 8 + b), 3)
            k = _rand(kk, (b, kv, s, h), dtype)
            v = _rand(kv_key, (b, kv, s, h), dtype)
            lengths = jnp.full((b,), s, jnp.int32)
            cases = [("chunk", t) for t in opts.chunk if t < s] + ([("full", s)] if opts.full else [])
            skipped = [t for t in opts.chunk if t >= s]
            if skipped:
                print(f"  chunks {skipped} >= context {s}: skipped (use --full for T = S)")
            for case, t in cases:
                q = _rand(jax.random.fold_in(kq, t), (b, n, t, h), dtype)
                off = jnp.int32(s - t)
                flops = attention_flops(b, n, h, t, s)
                iters = opts.iters or _auto_iters(flops)
                print(f"== {case} B={b} S={s} T={t} offset={s - t} ({flops / 1e12:.2f} TFLOP per call)", flush=True)
                config = dict(case=case, batch=b, context=s, chunk=t, offset=s - t)
                found = []
                for impl in opts.impls:
                    reason = _skip_reason(impl, opts, b, n, t, on_gpu)
                    if reason:
                        print(f"  {reason}: skipped")
                        continue
                    for label, note, call, make in _impl_calls(opts, impl, scale, t, s, h, tilings):
                        row = dict(config, impl=label, note=note)
                        try:
                            t0 = time.perf_counter()
                            sec = per_call_seconds(call, make(q, k, v, off, lengths), iters, opts.repeats)
                            row.update(ms=round(sec * 1e3, 4), tflops=round(flops / sec / 1e12, 2))
                            print(f"  {label:7s} {note[:40]:40s} {sec * 1e3:9.3f} ms {row['tflops']:7.1f} TFLOP/s"
                                  f"  ({time.perf_counter() - t0:.1f} s incl. compile)", flush=True)  # fmt: skip
                        except Exception as e:  # noqa: BLE001 - report, keep benchmarking
                            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                            print(f"  {label} {note} failed: {row['error']}", flush=True)
                        found.append(row)
                cudnn = next((r for r in found if r["impl"] == "cudnn" and "ms" in r), None)
                for r in found:
                    if cudnn is not None and "ms" in r:
                        r["x_cudnn_time"] = round(r["ms"] / cudnn["ms"], 3)
                rows.extend(found)
            del k, v
    print(write_results(opts.name, rows, meta, run_folder("bench", "attention", opts.out_dir)))
    if any(r.get("impl") == "cudnn" and r["case"] == "chunk" for r in rows):
        print(f"\ncudnn chunk rows: {CUDNN_CHUNK_NOTE}")
    return rows
