"""The rescoring kernel of two-stage selection and `retrieval.rerank` / `spotlight+rerank<R>`."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.candidate_scores import candidate_scores, candidate_scores_reference
from spotlight_jax import retrieval
from spotlight_jax.config import RetrievalConfig, split_method
from tests.kernel_test_base import INTERPRET, random_codes, rng

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-5}  # bf16 inputs, fp32 products: the same numbers as the reference


def _inputs(b, n, kv, s, h, c, dtype, seed):
    gen = rng(seed)
    q = jnp.asarray(gen.standard_normal((b, n, h)), dtype)
    kc = jnp.asarray(gen.standard_normal((b, kv, s, h)), dtype)
    idx = jnp.asarray(gen.integers(0, s, (b, kv, c)), jnp.int32)
    valid = jnp.asarray(gen.random((b, kv, c)) < 0.8)
    return q, kc, idx, valid


@pytest.mark.parametrize(
    "b,n,kv,s,h,c,dtype",
    [
        (2, 8, 2, 300, 32, 100, jnp.float32),  # C = 100 not a multiple of the 64-candidate block
        (1, 7, 1, 130, 64, 64, jnp.bfloat16),  # G = 7 (Qwen2.5's group) padded to the 16-row dot tile
        (2, 4, 4, 50, 16, 5, jnp.float32),  # G = 1, fewer candidates than one block
    ],
)
def test_kernel_matches_reference_and_numpy(b, n, kv, s, h, c, dtype):
    q, kc, idx, valid = _inputs(b, n, kv, s, h, c, dtype, seed=c)
    got = candidate_scores(q, kc, idx, valid, implementation="pallas", interpret=INTERPRET)
    want = candidate_scores_reference(q, kc, idx, valid, scale=1 / np.sqrt(h))
    assert got.shape == (b, kv, n // kv, c) and got.dtype == jnp.float32
    np.testing.assert_array_equal(
        np.isinf(np.asarray(got)), np.broadcast_to(~np.asarray(valid)[:, :, None, :], got.shape)
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=TOL[dtype], atol=TOL[dtype])
    # against numpy in float64 on the valid slots
    qn, kn = np.asarray(q, np.float64), np.asarray(kc, np.float64)
    g = n // kv
    for bi in range(b):
        for j in range(n):
            rows = kn[bi, j // g, np.asarray(idx)[bi, j // g]]  # [C, H]
            ok = np.asarray(valid)[bi, j // g]
            np.testing.assert_allclose(np.asarray(got)[bi, j // g, j % g][ok], (rows @ qn[bi, j] / np.sqrt(h))[ok],
                                       rtol=1e-4, atol=1e-4)  # fmt: skip


def test_clear_errors():
    q, kc, idx, valid = _inputs(1, 4, 2, 20, 16, 8, jnp.float32, 0)
    with pytest.raises(ValueError, match="candidate_scores takes"):
        candidate_scores(q[0], kc, idx, valid)
    with pytest.raises(ValueError, match="shapes disagree"):
        candidate_scores(q, kc[:, :1], idx, valid)


def test_rerank_over_every_row_is_the_oracle():
    """Candidates covering all live rows: the second stage picks exactly the oracle's tokens."""
    b, n, kv, s, h = 2, 8, 2, 200, 32
    q, kc, _, _ = _inputs(b, n, kv, s, h, 1, jnp.float32, seed=3)
    lengths = jnp.asarray([200, 137])
    k_max, budget = 30, jnp.asarray([30, 11])
    cand = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, kv, s))
    live = cand < lengths[:, None, None]
    for impl in ("xla", "pallas"):
        idx, valid = retrieval.rerank(q, kc, cand, live, lengths, 1 / np.sqrt(h), k_max, budget, impl)
        want_idx, want_valid = retrieval.topk_by_score(
            retrieval.group_attention_probs(q, kc, lengths, 1 / np.sqrt(h)), lengths, k_max, budget
        )
        want_valid = np.broadcast_to(np.asarray(want_valid), want_idx.shape)
        np.testing.assert_array_equal(np.asarray(valid), want_valid)
        for bi in range(b):
            for hh in range(kv):
                got = set(np.asarray(idx)[bi, hh][np.asarray(valid)[bi, hh]].tolist())
                assert got == set(np.asarray(want_idx)[bi, hh][np.asarray(want_valid)[bi, hh]].tolist())


class _CodesHash:
    """A hash module stand-in: fixed query codes (select only calls query_codes)."""

    def __init__(self, codes):
        self.codes = codes

    def query_codes(self, q):
        return self.codes


# select() runs hamming_topk compiled (its interpret mode is tested on its own): the Pallas case runs on the GPU.
@pytest.mark.parametrize("impl", ["xla", pytest.param("pallas", marks=pytest.mark.skipif(INTERPRET, reason="GPU"))])
def test_select_with_rerank(impl):
    """Through `select`: R * k covering the cache gives the oracle's tokens; a small R keeps only Hamming
    candidates, ranked by their exact scores."""
    b, n, kv, s, h, w = 2, 4, 2, 256, 16, 4
    q, kc, _, _ = _inputs(b, n, kv, s, h, 1, jnp.float32, seed=5)
    gen = rng(9)
    hashes = _CodesHash(jnp.asarray(random_codes(gen, (b, n, w))))
    codes = jnp.asarray(random_codes(gen, (b, kv, s, w)))
    lengths = jnp.asarray([256, 190])
    scale = 1 / np.sqrt(h)
    base = RetrievalConfig(method="spotlight", keep_ratio=0.05, min_keep=4, bits=32 * w, implementation=impl)
    oracle = retrieval.select(q, kc, lengths, scale, cfg=dataclasses.replace(base, method="oracle"))
    full = retrieval.select(q, kc, lengths, scale, cfg=dataclasses.replace(base, rerank=20), code_cache=codes,
                            hash_module=hashes)  # fmt: skip
    (gi, gv), (wi, wv) = full, oracle
    gv, wv = (np.broadcast_to(np.asarray(v), np.shape(i)) for v, i in ((gv, gi), (wv, wi)))
    np.testing.assert_array_equal(gv, wv)
    for bi in range(b):
        for hh in range(kv):
            assert set(np.asarray(gi)[bi, hh][gv[bi, hh]]) == set(np.asarray(wi)[bi, hh][wv[bi, hh]])
    # R = 2: every kept row is one of the 2k Hamming candidates, and the kept rows beat the dropped candidates
    cfg2 = dataclasses.replace(base, rerank=2)
    idx, valid = retrieval.select(q, kc, lengths, scale, cfg=cfg2, code_cache=codes, hash_module=hashes)
    k_max = cfg2.k_max(s)
    budget = retrieval.live_budget(lengths, cfg2, k_max)
    cand = retrieval.hamming_topk(hashes.codes, codes, lengths, 2 * k_max, 2 * budget)
    probs = np.asarray(retrieval.group_attention_probs(q, kc, lengths, scale))
    for bi in range(b):
        for hh in range(kv):
            kept = np.asarray(idx)[bi, hh][np.broadcast_to(np.asarray(valid), idx.shape)[bi, hh]]
            pool = np.asarray(cand.indices)[bi, hh][np.asarray(cand.valid)[bi, hh]]
            assert set(kept) <= set(pool) and len(kept) == int(budget[bi])
            dropped = sorted(set(pool) - set(kept))
            assert probs[bi, hh, kept].min() >= probs[bi, hh, dropped].max()


def test_rerank_modifier_and_validation():
    assert split_method("spotlight+rerank4") == ("spotlight", {"rerank": 4})
    with pytest.raises(ValueError, match="rerank must be an integer >= 1"):
        RetrievalConfig(method="spotlight", rerank=0)
    with pytest.raises(ValueError, match="applies to linear / spotlight"):
        RetrievalConfig(method="oracle", rerank=4)


def test_mass_budget_counts_rows_through_the_crossing():
    probs = jnp.asarray([[[0.5, 0.3, 0.1, 0.05, 0.05]]]) * 2  # G = 2 query heads: total mass 2
    keep = lambda p, lo=1, cap=5: int(retrieval.mass_budget(probs, 2, p, lo, jnp.asarray([cap]))[0, 0])
    assert keep(0.5) == 1 and keep(0.8) == 2 and keep(0.81) == 3 and keep(1.0) == 5
    assert keep(0.5, lo=3) == 3 and keep(0.95, cap=2) == 2


@pytest.mark.parametrize("method", ["oracle", "rerank"])
def test_adaptive_budget_keeps_the_fewest_rows_reaching_the_mass(method):
    b, n, kv, s, h, w = 2, 4, 2, 256, 16, 4
    q, kc, _, _ = _inputs(b, n, kv, s, h, 1, jnp.float32, seed=11)
    q = q * 4.0  # peaked attention: a few rows hold most of the mass
    gen = rng(2)
    hashes = _CodesHash(jnp.asarray(random_codes(gen, (b, n, w))))
    codes = jnp.asarray(random_codes(gen, (b, kv, s, w)))
    lengths = jnp.asarray([256, 190])
    scale = 1 / np.sqrt(h)
    fields = dict(method="oracle") if method == "oracle" else dict(method="spotlight", rerank=64)
    cfg = RetrievalConfig(keep_ratio=0.25, min_keep=2, bits=32 * w, implementation="xla", top_p=0.7, **fields)
    idx, valid = retrieval.select(q, kc, lengths, scale, cfg=cfg, code_cache=codes, hash_module=hashes)
    valid = np.broadcast_to(np.asarray(valid), idx.shape)
    probs = np.asarray(retrieval.group_attention_probs(q, kc, lengths, scale))  # R * k covers the cache: exact mass
    cap = np.asarray(retrieval.live_budget(lengths, cfg, cfg.k_max(s)))
    counts = valid.sum(-1)
    assert (counts >= 2).all() and (counts < cap[:, None]).any(), "the mass rule should cut some heads below the cap"
    for bi in range(b):
        for hh in range(kv):
            kept = np.sort(probs[bi, hh, np.asarray(idx)[bi, hh][valid[bi, hh]]])[::-1]
            if counts[bi, hh] < cap[bi]:
                assert kept.sum() >= 0.7 * (n // kv) - 1e-5  # reaches the mass ...
                assert counts[bi, hh] == 2 or kept[:-1].sum() < 0.7 * (n // kv)  # ... and one row fewer does not


def test_adaptive_budget_needs_exact_scores():
    with pytest.raises(ValueError, match="top_p needs exact scores"):
        RetrievalConfig(method="spotlight", top_p=0.9)
    assert split_method("spotlight+rerank4+mass0.9") == ("spotlight", {"rerank": 4, "top_p": 0.9})
    with pytest.raises(ValueError, match=r"\+mass<P>"):
        split_method("oracle+mass2")
