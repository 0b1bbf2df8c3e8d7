import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dense_decode_attention_reference, sparse_decode_attention, sparse_decode_attention_reference
from pallas_kernels._common import MERGE_PROGRAMS, cdiv, merge_block_h, merge_group_size
from pallas_kernels.sparse_decode_attention import sparse_decode_attention_rows
from tests.kernel_test_base import INTERPRET, rng

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(b, n, kv, s, h, kk, dtype, seed):
    gen = rng(seed)
    q = jnp.asarray(gen.standard_normal((b, n, h)), dtype)
    kc = jnp.asarray(gen.standard_normal((b, kv, s, h)), dtype)
    vc = jnp.asarray(gen.standard_normal((b, kv, s, h)), dtype)
    idx = jnp.asarray(gen.integers(0, s, (b, kv, kk)), jnp.int32)
    valid = jnp.asarray(gen.random((b, kv, kk)) < 0.8)
    return q, kc, vc, idx, valid


def _numpy_attention(q, kc, vc, idx, valid, scale):
    q, kc, vc = (np.asarray(a, np.float64) for a in (q, kc, vc))
    idx, valid = np.asarray(idx), np.asarray(valid)
    b, n, h = q.shape
    kv = kc.shape[1]
    out = np.zeros((b, n, h))
    for bi in range(b):
        for j in range(n):
            hh = j // (n // kv)
            sel = idx[bi, hh][valid[bi, hh]]
            if len(sel) == 0:
                continue
            logits = kc[bi, hh, sel] @ q[bi, j] * scale
            p = np.exp(logits - logits.max())
            out[bi, j] = p @ vc[bi, hh, sel] / p.sum()
    return out


# (batch, N, K, S, H, k): G in {1, 3, 4, 7, 8}
CASES = [
    (1, 2, 2, 255, 64, 40),
    (3, 9, 3, 513, 64, 33),
    (2, 8, 2, 100, 32, 70),
    (1, 28, 4, 300, 128, 61),
    (2, 16, 2, 64, 64, 5),
]


@pytest.mark.parametrize("b,n,kv,s,h,kk", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_sparse_attention_matches_numpy(b, n, kv, s, h, kk, dtype):
    q, kc, vc, idx, valid = _inputs(b, n, kv, s, h, kk, dtype, seed=s + kk)
    valid = valid.at[0, 0].set(False)  # one head with nothing selected -> zeros, no NaN
    want = _numpy_attention(q, kc, vc, idx, valid, 1 / np.sqrt(h))
    ref = sparse_decode_attention_reference(q, kc, vc, idx, valid)
    np.testing.assert_allclose(np.asarray(ref, np.float64), want, rtol=TOL[dtype], atol=TOL[dtype])
    got = sparse_decode_attention(q, kc, vc, idx, valid, implementation="pallas", interpret=INTERPRET, chunk=32)
    assert got.dtype == dtype and got.shape == q.shape
    assert np.isfinite(np.asarray(got, np.float32)).all()
    g = n // kv
    np.testing.assert_array_equal(np.asarray(got[0, :g], np.float32), 0.0)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_all_selected_equals_dense(dtype):
    b, n, kv, s, h = 3, 12, 4, 513, 64
    lengths = np.array([3, 255, 513])
    q, kc, vc, _, _ = _inputs(b, n, kv, s, h, 1, dtype, seed=11)
    gen = rng(5)
    kk = 520  # k > every length; valid tokens in shuffled order, the rest invalid
    idx = np.zeros((b, kv, kk), np.int32)
    for bi in range(b):
        for hh in range(kv):
            idx[bi, hh, : lengths[bi]] = gen.permutation(lengths[bi])
    valid = np.broadcast_to(np.arange(kk)[None, None] < lengths[:, None, None], idx.shape)
    dense = dense_decode_attention_reference(q, kc, vc, jnp.asarray(lengths))
    got = sparse_decode_attention(
        q, kc, vc, jnp.asarray(idx), jnp.asarray(valid), implementation="pallas", interpret=INTERPRET
    )
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(dense, np.float32), rtol=TOL[dtype], atol=TOL[dtype]
    )


@pytest.mark.parametrize("combine", ["atomic", "kernel", "xla"])
def test_count_mask_and_scale(combine):
    b, n, kv, s, h, kk = 2, 6, 2, 200, 64, 45
    q, kc, vc, idx, _ = _inputs(b, n, kv, s, h, kk, jnp.float32, seed=2)
    n_valid = jnp.asarray([45, 0, 1, 17], jnp.int32)
    valid = (jnp.arange(kk)[None] < n_valid[:, None]).reshape(b, kv, kk)
    want = _numpy_attention(q, kc, vc, idx, valid, 0.3)
    got = sparse_decode_attention_rows(
        q, kc, vc, idx.reshape(b * kv, kk), n_valid, scale=0.3, chunk=16, block_t=16, combine=combine,
        interpret=INTERPRET,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# Ragged count masks over C = 21 chunks of 16 slots (G = 7, H = 128: the atomic merge takes two levels,
# groups of 8, 8 and 5 chunks): a full row, an empty row (zeros), one slot, and a row ending mid-chunk.
COMBINE_CASE = dict(b=2, n=14, kv=2, s=400, h=128, kk=330, n_valid=[330, 0, 1, 201])


@pytest.mark.parametrize("combine", ["atomic", "kernel", "xla"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_combine_modes_many_chunks(combine, dtype):
    b, n, kv, s, h, kk = (COMBINE_CASE[k] for k in ("b", "n", "kv", "s", "h", "kk"))
    assert merge_group_size(cdiv(kk, 16), n // kv, h) < cdiv(kk, 16)  # the two-level merge is exercised
    q, kc, vc, idx, _ = _inputs(b, n, kv, s, h, kk, dtype, seed=21)
    n_valid = jnp.asarray(COMBINE_CASE["n_valid"], jnp.int32)
    valid = (jnp.arange(kk)[None] < n_valid[:, None]).reshape(b, kv, kk)
    want = _numpy_attention(q, kc, vc, idx, valid, 1 / np.sqrt(h))
    got = sparse_decode_attention_rows(
        q, kc, vc, idx.reshape(b * kv, kk), n_valid, chunk=16, block_t=16, combine=combine, interpret=INTERPRET
    )
    assert got.dtype == dtype and got.shape == q.shape
    np.testing.assert_array_equal(np.asarray(got[0, n // kv :], np.float32), 0.0)  # row with no valid slot
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=TOL[dtype], atol=TOL[dtype])


def test_merge_block_h_rule():
    assert merge_block_h(4, 128) == 8  # batch 1, 4 KV heads: 64 programs of 8 columns (not below 8)
    assert merge_block_h(16, 128) == 16  # 16 rows x 8 column blocks = MERGE_PROGRAMS
    assert merge_block_h(32, 128) == 32  # enough rows: 4 programs per row
    assert merge_block_h(MERGE_PROGRAMS, 128) == 32
    assert merge_block_h(1, 4) == 4  # small heads: one program per row


@pytest.mark.parametrize("block_h", [8, 32, 128])
def test_merge_kernel_column_blocks(block_h):
    """The "kernel" merge gives the same output whatever columns each of its programs takes."""
    b, n, kv, s, h, kk = (COMBINE_CASE[k] for k in ("b", "n", "kv", "s", "h", "kk"))
    q, kc, vc, idx, _ = _inputs(b, n, kv, s, h, kk, jnp.float32, seed=23)
    n_valid = jnp.asarray(COMBINE_CASE["n_valid"], jnp.int32)
    valid = (jnp.arange(kk)[None] < n_valid[:, None]).reshape(b, kv, kk)
    want = _numpy_attention(q, kc, vc, idx, valid, 1 / np.sqrt(h))
    got = sparse_decode_attention_rows(
        q, kc, vc, idx.reshape(b * kv, kk), n_valid, chunk=16, block_t=16, merge_block_h=block_h, interpret=INTERPRET
    )
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="block_h"):
        sparse_decode_attention_rows(
            q, kc, vc, idx.reshape(b * kv, kk), n_valid, chunk=16, merge_block_h=48, interpret=INTERPRET
        )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_single_chunk_writes_output_directly(dtype):
    """C == 1 (chunk >= k): no partials, the program normalises and stores the output itself."""
    b, n, kv, s, h, kk = (COMBINE_CASE[k] for k in ("b", "n", "kv", "s", "h", "kk"))
    q, kc, vc, idx, valid = _inputs(b, n, kv, s, h, kk, dtype, seed=22)
    valid = valid.at[1, 0].set(False)
    want = _numpy_attention(q, kc, vc, idx, valid, 1 / np.sqrt(h))
    got = sparse_decode_attention(q, kc, vc, idx, valid, implementation="pallas", interpret=INTERPRET, chunk=512)
    np.testing.assert_array_equal(np.asarray(got[1, : n // kv], np.float32), 0.0)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=TOL[dtype], atol=TOL[dtype])


def test_unknown_combine_raises():
    q, kc, vc, idx, valid = _inputs(1, 2, 1, 64, 32, 40, jnp.float32, seed=0)
    with pytest.raises(ValueError, match="combine"):
        sparse_decode_attention(q, kc, vc, idx, valid, implementation="pallas", interpret=True, chunk=16, combine="x")
