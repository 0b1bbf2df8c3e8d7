"""Prefill flash attention: the blocked XLA path and the Pallas kernel (interpret mode on CPU, compiled on a GPU)
against the materialised-scores reference, which is itself checked against a numpy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention, flash_attention_reference
from tests.kernel_test_base import INTERPRET, rng

# fp32: IEEE dots everywhere, only the summation order differs. bf16: the kernels round p to bf16 for the second dot
# (the reference keeps it fp32).
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _inputs(b, n, kv, t, s, h, dtype, seed):
    gen = rng(seed)
    q = jnp.asarray(gen.standard_normal((b, n, t, h)), dtype)
    kc = jnp.asarray(gen.standard_normal((b, kv, s, h)), dtype)
    vc = jnp.asarray(gen.standard_normal((b, kv, s, h)), dtype)
    return q, kc, vc


def _numpy_attention(q, kc, vc, offset, lengths, scale, window=None):
    q, kc, vc = (np.asarray(a, np.float64) for a in (q, kc, vc))
    b, n, t, h = q.shape
    g = n // kc.shape[1]
    out = np.zeros((b, n, t, h))
    for bi in range(b):
        for j in range(n):
            for ti in range(t):
                p = offset + ti
                lo = 0 if window is None else max(0, p - window + 1)
                hi = min(p + 1, lengths[bi])
                if hi <= lo:
                    continue
                logits = kc[bi, j // g, lo:hi] @ q[bi, j, ti] * scale
                w = np.exp(logits - logits.max())
                out[bi, j, ti] = w @ vc[bi, j // g, lo:hi] / w.sum()
    return out


def _check(got, want, dtype, shape):
    assert got.dtype == jnp.float32 and got.shape == shape
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=TOL[dtype],
                               atol=TOL[dtype])  # fmt: skip


# (B, N, K, T, S, H, offset, lengths, window, pallas (block_q, block_k), xla block_k)
CASES = {
    # offset 0, ragged lengths, T = 37 not a multiple of block_q, GQA N=4 K=2
    "first_chunk_ragged": (2, 4, 2, 37, 64, 16, 0, [37, 20], None, (16, 16), 16),
    # a chunk in the middle of the cache, S = 300 not a multiple of block_k (nor of the XLA block), N = K; row 1
    # has lengths < offset + T (padding queries past its end), row 0 keys past its length hold live-looking data
    "mid_cache_mha": (2, 2, 2, 40, 300, 32, 200, [240, 217], None, (16, 32), 64),
    # T = 1 (a decode-like call) and a lengths == 0 row
    "single_query": (2, 4, 2, 1, 100, 16, 57, [58, 0], None, (16, 16), 32),
    # sliding window shorter than the chunk; row 1's last queries' windows end before its length: zeros
    "window": (2, 4, 2, 70, 260, 16, 150, [220, 180], 33, (32, 16), 32),
    # caches shorter than the key tile: S = 20 < block_k 32 (the tile shrinks) and S = 10 < 16 (the cache is padded)
    "short_cache": (2, 4, 2, 16, 20, 16, 4, [20, 13], None, (16, 32), 16),
    "tiny_cache": (1, 2, 1, 5, 10, 16, 5, [10], None, (16, 16), 8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case):
    b, n, kv, t, s, h, offset, lengths, window, (bq, bk), xla_bk = CASES[case]
    dtype = jnp.float32
    q, kc, vc = _inputs(b, n, kv, t, s, h, dtype, seed=len(case))
    ln = jnp.asarray(lengths, jnp.int32)
    scale = 1 / np.sqrt(h)
    want = flash_attention_reference(q, kc, vc, offset, ln, scale=scale, window=window)
    xla = flash_attention(q, kc, vc, offset, ln, scale=scale, window=window, implementation="xla", block_k=xla_bk)
    _check(xla, want, dtype, q.shape)
    got = flash_attention(
        q, kc, vc, offset, ln, scale=scale, window=window, implementation="pallas", interpret=INTERPRET,
        block_q=bq, block_k=bk,
    )  # fmt: skip
    _check(got, want, dtype, q.shape)
    for bi, length in enumerate(lengths):  # queries that see no key: exact zeros
        p = offset + np.arange(t)
        empty = (p < 0) if length else (p >= 0)  # all queries when the row is empty
        if window is not None:
            empty |= p - window + 1 >= length
        for out in (xla, got):
            np.testing.assert_array_equal(np.asarray(out)[bi][:, empty], 0.0)


def test_reference_matches_numpy():
    b, n, kv, t, s, h, offset, lengths, window = 2, 4, 2, 9, 40, 8, 20, [29, 25], 6
    q, kc, vc = _inputs(b, n, kv, t, s, h, jnp.float32, seed=5)
    for win in (None, window):
        want = _numpy_attention(q, kc, vc, offset, lengths, 0.3, win)
        got = flash_attention_reference(q, kc, vc, offset, jnp.asarray(lengths, jnp.int32), scale=0.3, window=win)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)


def test_bf16_default_tiles_wide_window():
    """bf16 inputs, the default tiling (capped by T and S) and a window longer than the context (no effect)."""
    b, n, kv, t, s, h, offset, lengths, window = 2, 4, 2, 50, 200, 32, 120, [170, 150], 1000
    q, kc, vc = _inputs(b, n, kv, t, s, h, jnp.bfloat16, seed=11)
    ln = jnp.asarray(lengths, jnp.int32)
    want = flash_attention_reference(q, kc, vc, offset, ln, scale=0.2)
    for impl in ("xla", "pallas"):
        got = flash_attention(q, kc, vc, offset, ln, scale=0.2, window=window, implementation=impl, interpret=INTERPRET)
        _check(got, want, jnp.bfloat16, q.shape)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_traced_offset_under_jit(impl):
    """One compiled program serves every chunk position (offset is a traced int32)."""
    b, n, kv, t, s, h = 1, 4, 2, 20, 96, 16
    q, kc, vc = _inputs(b, n, kv, t, s, h, jnp.float32, seed=3)
    kw = dict(block_q=16, block_k=16) if impl == "pallas" else dict(block_k=32)
    traces = []

    @jax.jit
    def f(q, k, v, off, ln):
        traces.append(None)
        return flash_attention(q, k, v, off, ln, scale=0.25, implementation=impl, interpret=INTERPRET, **kw)

    for offset in (0, 37, 76):
        ln = jnp.asarray([offset + t], jnp.int32)
        want = flash_attention_reference(q, kc, vc, offset, ln, scale=0.25)
        _check(f(q, kc, vc, jnp.int32(offset), ln), want, jnp.float32, q.shape)
    assert len(traces) == 1


def test_default_implementation_and_any_head_dim_on_xla():
    """Off the GPU the default is the XLA loop, which takes any head_dim (the Pallas path needs a power of two)."""
    b, n, kv, t, s, h = 1, 4, 4, 5, 30, 24
    q, kc, vc = _inputs(b, n, kv, t, s, h, jnp.float32, seed=9)
    ln = jnp.asarray([25], jnp.int32)
    want = flash_attention_reference(q, kc, vc, 20, ln, scale=0.2)
    if jax.default_backend() != "gpu":
        _check(flash_attention(q, kc, vc, 20, ln, scale=0.2), want, jnp.float32, q.shape)
    _check(flash_attention(q, kc, vc, 20, ln, scale=0.2, implementation="xla"), want, jnp.float32, q.shape)
    with pytest.raises(ValueError, match="power of two >= 16, got 24"):
        flash_attention(q, kc, vc, 20, ln, scale=0.2, implementation="pallas")


def test_clear_errors():
    q, kc, vc = _inputs(2, 4, 2, 8, 32, 16, jnp.float32, seed=1)
    ln = jnp.asarray([8, 8], jnp.int32)
    call = lambda *a, **kw: flash_attention(*a, **{"scale": 0.25, **kw})
    with pytest.raises(ValueError, match=r"q must be \[B, N, T, H\]"):
        call(q[0], kc, vc, 0, ln)
    with pytest.raises(ValueError, match=r"k_cache must be \[B, K, S, H\]"):
        call(q, kc[0], vc[0], 0, ln)
    with pytest.raises(ValueError, match="v_cache shape"):
        call(q, kc, vc[:, :, :16], 0, ln)
    with pytest.raises(ValueError, match="not a multiple of KV heads K=3"):
        k3 = jnp.zeros((2, 3, 32, 16))
        call(q, k3, k3, 0, ln)
    with pytest.raises(ValueError, match="disagree on B or H"):
        call(q, kc[:1], vc[:1], 0, ln)
    with pytest.raises(ValueError, match=r"lengths must be \[B\]"):
        call(q, kc, vc, 0, ln[:1])
    with pytest.raises(ValueError, match="offset must be an int32 scalar"):
        call(q, kc, vc, jnp.zeros((2,), jnp.int32), ln)
    with pytest.raises(ValueError, match="window must be None or an int >= 1"):
        call(q, kc, vc, 0, ln, window=0)
    with pytest.raises(ValueError, match="implementation must be one of"):
        call(q, kc, vc, 0, ln, implementation="cuda")
    with pytest.raises(ValueError, match="block_q must be a power of two >= 16, got 24"):
        call(q, kc, vc, 0, ln, implementation="pallas", block_q=24)


def test_bench_attention_cpu_smoke(tmp_path):
    """`bench attention` end to end on the tiny CPU config: XLA + Pallas (interpret), results written to tmp."""
    import json

    from spotlight_jax.bench.__main__ import main

    argv = [
        "attention", "--impls", "xla", "pallas", "--interpret", "--context", "256", "--chunk", "64",
        "--heads", "4:2:32", "--gemm-size", "128", "--iters", "1", "--repeats", "1", "--out-dir", str(tmp_path),
    ]  # fmt: skip
    main(argv)
    payload = json.loads((tmp_path / "prefill_attention.json").read_text())
    rows = payload["rows"]
    assert {r["impl"] for r in rows} == {"xla dot", "xla", "pallas"}
    for r in rows:
        assert "error" not in r and r["ms"] > 0
    att = [r for r in rows if r["case"] == "chunk"]
    assert all((r["context"], r["chunk"], r["offset"]) == (256, 64, 192) for r in att)
    assert (tmp_path / "prefill_attention.md").exists()
