import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention, decode_attention_reference
from pallas_kernels._common import merge_group_size
from spotlight_jax import retrieval
from tests.kernel_test_base import INTERPRET, rng

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(b, n, kv, s, h, dtype, seed):
    gen = rng(seed)
    q = jnp.asarray(gen.standard_normal((b, n, h)), dtype)
    kc = jnp.asarray(gen.standard_normal((b, kv, s, h)), dtype)
    vc = jnp.asarray(gen.standard_normal((b, kv, s, h)), dtype)
    return q, kc, vc


def _numpy_attention(q, kc, vc, lengths, scale, window=None):
    q, kc, vc = (np.asarray(a, np.float64) for a in (q, kc, vc))
    b, n, h = q.shape
    kv = kc.shape[1]
    out = np.zeros((b, n, h))
    for bi in range(b):
        lo = 0 if window is None else max(0, lengths[bi] - window)
        for j in range(n):
            hh = j // (n // kv)
            if lengths[bi] == 0:
                continue
            logits = kc[bi, hh, lo : lengths[bi]] @ q[bi, j] * scale
            p = np.exp(logits - logits.max())
            out[bi, j] = p @ vc[bi, hh, lo : lengths[bi]] / p.sum()
    return out


# (batch, N, K, S, H, lengths, num_splits): G in {1, 3, 4, 7, 8}; S not a multiple of the block;
# ragged lengths with 0, 1, 3, 255, 513, 4097; None = the default split count.
CASES = [
    (1, 2, 2, 255, 64, [255], None),
    (3, 9, 3, 4100, 64, [0, 513, 4097], 8),
    (3, 8, 2, 600, 128, [1, 3, 255], 4),
    (1, 28, 4, 300, 128, [255], 3),
    (2, 16, 2, 513, 64, [513, 3], None),
]


@pytest.mark.parametrize("b,n,kv,s,h,lengths,num_splits", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_decode_attention_matches_numpy(b, n, kv, s, h, lengths, num_splits, dtype):
    q, kc, vc = _inputs(b, n, kv, s, h, dtype, seed=s + n)
    ln = jnp.asarray(lengths, jnp.int32)
    want = _numpy_attention(q, kc, vc, lengths, 1 / np.sqrt(h))
    ref = decode_attention(q, kc, vc, ln, implementation="xla")
    np.testing.assert_allclose(np.asarray(ref, np.float64), want, rtol=TOL[dtype], atol=TOL[dtype])
    got = decode_attention(q, kc, vc, ln, implementation="pallas", interpret=INTERPRET, num_splits=num_splits)
    assert got.dtype == jnp.float32 and got.shape == q.shape
    assert np.isfinite(np.asarray(got)).all()
    for bi in np.flatnonzero(np.asarray(lengths) == 0):  # no live key: zeros, not NaN
        np.testing.assert_array_equal(np.asarray(got[bi]), 0.0)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("combine", ["atomic", "kernel", "xla"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_window_and_scale(dtype, combine):
    b, n, kv, s, h, window = 3, 12, 4, 700, 64, 100
    lengths = [513, 40, 101]  # window inside, longer than, and one past the live rows
    q, kc, vc = _inputs(b, n, kv, s, h, dtype, seed=7)
    ln = jnp.asarray(lengths, jnp.int32)
    want = _numpy_attention(q, kc, vc, lengths, 0.3, window)
    ref = decode_attention_reference(q, kc, vc, ln, 0.3, window)
    np.testing.assert_allclose(np.asarray(ref, np.float64), want, rtol=TOL[dtype], atol=TOL[dtype])
    got = decode_attention(
        q, kc, vc, ln, 0.3, window=window, implementation="pallas", interpret=INTERPRET, num_splits=3, block_s=32,
        combine=combine,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=TOL[dtype], atol=TOL[dtype])


# Lengths 0 (zeros), 1 (one live piece of 21) and 333 over C = 21 pieces of 16 rows (G = 7, H = 128: the atomic
# merge takes two levels, groups of 8, 8 and 5 pieces), and the same with C == 1 (no partials).
@pytest.mark.parametrize(
    "combine,num_splits",
    [("atomic", 21), ("kernel", 21), ("xla", 21), ("atomic", 1)],
    ids=["atomic", "kernel", "xla", "C1"],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_combine_modes(combine, num_splits, dtype):
    b, n, kv, s, h, lengths = 3, 14, 2, 400, 128, [0, 1, 333]
    assert merge_group_size(21, n // kv, h) < 21
    q, kc, vc = _inputs(b, n, kv, s, h, dtype, seed=21)
    want = _numpy_attention(q, kc, vc, lengths, 1 / np.sqrt(h))
    got = decode_attention(
        q, kc, vc, jnp.asarray(lengths, jnp.int32), implementation="pallas", interpret=INTERPRET,
        block_s=16, num_splits=num_splits, combine=combine,
    )  # fmt: skip
    assert got.dtype == jnp.float32 and got.shape == q.shape
    np.testing.assert_array_equal(np.asarray(got[0]), 0.0)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype,window", [(jnp.float32, None), (jnp.bfloat16, None), (jnp.bfloat16, 64)])
def test_retrieval_dense_dispatch(dtype, window):
    """retrieval.dense_decode_attention: the Pallas path equals its XLA path (lengths >= 1, as in decoding)."""
    b, n, kv, s, h = 2, 9, 3, 1030, 64
    q, kc, vc = _inputs(b, n, kv, s, h, dtype, seed=3)
    ln = jnp.asarray([1030, 77], jnp.int32)
    with jax.default_matmul_precision("float32"):  # no TF32 in the XLA einsums on a GPU
        xla = retrieval.dense_decode_attention(q, kc, vc, ln, 0.125, window)
    got = retrieval.dense_decode_attention(q, kc, vc, ln, 0.125, window, implementation="pallas")
    assert got.dtype == xla.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(xla), rtol=TOL[dtype], atol=TOL[dtype])
