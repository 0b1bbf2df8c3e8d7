import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import hamming_scores, hamming_scores_reference, hamming_topk, hamming_topk_reference
from pallas_kernels._common import MAX_SPINS, sync_count, wait_count
from pallas_kernels.hamming_topk import (
    csa_compress,
    default_grid,
    hamming_topk_rows,
    hamming_topk_rows_stats,
    level_steps,
)
from pallas_kernels.hamming_topk.arithmetic import _csa_scores, _query_word_planes
from tests.kernel_test_base import INTERPRET, random_codes, rng, scores_np

# (batch, query heads, KV heads, S, bits): covers G in {1, 3, 4, 7, 8} and bits in {32 ... 256}.
SCORE_CASES = [
    (1, 3, 3, 255, 32),
    (3, 9, 3, 513, 64),
    (2, 8, 2, 40, 128),
    (1, 28, 4, 300, 128),
    (3, 32, 4, 77, 256),
]


@pytest.mark.parametrize("csa", [True, False], ids=["csa", "planes"])
@pytest.mark.parametrize("b,n,kv,s,bits", SCORE_CASES)
def test_scores_exact(b, n, kv, s, bits, csa):
    gen = rng(b * 1000 + s)
    q = random_codes(gen, (b, n, bits // 32))
    k = random_codes(gen, (b, kv, s, bits // 32))
    want = scores_np(q, k)
    np.testing.assert_array_equal(np.asarray(hamming_scores_reference(jnp.asarray(q), jnp.asarray(k))), want)
    got = hamming_scores(jnp.asarray(q), jnp.asarray(k), implementation="pallas", interpret=INTERPRET, csa=csa)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), want)


def _popcount_sum(terms):
    """sum_(e, x) 2^e popcount(x) in plain jnp, int32 [Q]."""
    return sum(lax.population_count(x).astype(jnp.int32) << e for e, x in terms)


# Column sizes of the scoring tree: P = bit_length(G) columns of W words, G in 1..8, W in {1, 2, 4, 8}; plus
# ragged ones (carries into empty and into longer columns).
CSA_COLUMNS = sorted({(w,) * g.bit_length() for g in range(1, 9) for w in (1, 2, 4, 8)})
CSA_COLUMNS += [(5, 0, 3, 1), (0, 7), (1, 5, 2)]


@pytest.mark.parametrize("counts", CSA_COLUMNS, ids=lambda c: "x".join(map(str, c)))
def test_csa_compress_matches_direct_sum(counts):
    """The carry-save tree keeps the weighted popcount sum exactly, with fewer words (any full-adder cap)."""
    gen = rng(sum(c << (3 * i) for i, c in enumerate(counts)))
    words = jnp.asarray(random_codes(gen, (sum(counts), 64)).view(np.int32))
    it = iter(words)
    columns = [[next(it) for _ in range(c)] for c in counts]
    want = _popcount_sum([(e, x) for e, col in enumerate(columns) for x in col])
    full_adders = sum(counts) - len(csa_compress(columns))  # each full adder removes one word
    for cap in (None, 0, 1, 2):
        out = csa_compress(columns, max_full_adders=cap)
        np.testing.assert_array_equal(np.asarray(_popcount_sum(out)), np.asarray(want))
        assert len(out) <= sum(counts)
        if cap is not None:
            assert len(out) >= sum(counts) - cap
    if max(counts) >= 3:
        assert full_adders > 0


def test_csa_compress_counts():
    """Popcounts left per token for the common shapes (G = 7 / 4 / 8 at 128 bits, G = 1 at 128 / 256 bits)."""
    for g, w, want in [(7, 4, 7), (4, 4, 7), (8, 4, 7), (1, 4, 3), (1, 8, 4), (7, 8, 8), (7, 1, 3)]:
        cols = [[jnp.zeros((1,), jnp.int32)] * w for _ in range(g.bit_length())]
        assert len(csa_compress(cols)) == want, (g, w)


@pytest.mark.parametrize("bits", [32, 64, 128, 256])
def test_csa_scores_match_reference(bits):
    """The kernel's CSA scoring (query word planes + tree) outside Pallas, for every G in 1..8."""
    w = bits // 32
    gen = rng(bits)
    for g in range(1, 9):
        q = random_codes(gen, (1, g, w))
        k = random_codes(gen, (1, 1, 200, w), distinct=50)
        k[0, 0, 0], k[0, 0, 1] = 0, 0xFFFFFFFF  # all-zero / all-one keys: the extreme scores
        want = scores_np(q, k)[0, 0]  # = hamming_scores_reference (test_scores_exact)
        # numpy int32 operands (same bit semantics as the kernel's int32, without per-op dispatch)
        sel = _query_word_planes(q[0].view(np.int32), g, g.bit_length())
        words = [np.ascontiguousarray(k[0, 0, :, i]).view(np.int32) for i in range(w)]
        for cap in (None, 1):
            got = _csa_scores(words, sel, cap)
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"G={g} bits={bits} cap={cap}")


def _check_topk(out, q, k, lengths, kk, budget=None):
    """Exact up to ties: per row, valid count, in-range unique indices, recomputed = returned = reference."""
    sc = scores_np(q, k)
    idx, scores, valid = (np.asarray(a) for a in out)
    b, kv, _ = idx.shape
    live = np.full(b, kk) if budget is None else np.minimum(np.asarray(budget), kk)
    for bi in range(b):
        n_valid = min(live[bi], lengths[bi])
        masked = np.where(np.arange(sc.shape[2]) < lengths[bi], sc[bi], -1)
        for h in range(kv):
            v = valid[bi, h]
            assert v.sum() == n_valid and v[:n_valid].all(), (bi, h)
            sel = idx[bi, h][v]
            assert (sel >= 0).all() and (sel < lengths[bi]).all()
            assert len(np.unique(sel)) == len(sel)
            np.testing.assert_array_equal(scores[bi, h][v], sc[bi, h, sel])
            want = np.sort(masked[h])[::-1][:n_valid]
            np.testing.assert_array_equal(np.sort(scores[bi, h][v])[::-1], want)
            # invalid slots hold a safe index
            assert (idx[bi, h][~v] == 0).all() and (scores[bi, h][~v] == 0).all()


def _rows_out(idx, sc, nv, b, kv, kk):
    """hamming_topk_rows outputs ([BK, k] indices / scores, [BK] n_valid) as (indices, scores, valid) [B, K, k]."""
    valid = np.arange(kk)[None, :] < np.asarray(nv)[:, None]
    return np.asarray(idx).reshape(b, kv, kk), np.asarray(sc).reshape(b, kv, kk), valid.reshape(b, kv, kk)


# (batch, N, K, S, bits, lengths, k, block_s, T, distinct codes, max blocks per row)
TOPK_CASES = [
    pytest.param(3, 9, 3, 513, 64, (3, 255, 513), 40, 128, 32, None, 64, id="ragged-G3"),
    pytest.param(3, 9, 3, 513, 64, (3, 255, 513), 40, 64, 32, None, 2, id="ragged-G3-inner-loop"),
    pytest.param(1, 28, 4, 4097, 128, (4097,), 82, 1024, 32, None, 64, id="qwen-4097"),
    pytest.param(1, 28, 4, 4097, 128, (4097,), 82, None, 32, None, 64, id="qwen-4097-default-grid"),
    pytest.param(1, 8, 8, 255, 32, (255,), 255, 64, 32, 7, 64, id="G1-k=len-ties"),
    pytest.param(2, 16, 2, 300, 128, (300, 17), 1, 128, 16, None, 64, id="G8-k1-T16"),
    pytest.param(2, 14, 2, 130, 256, (130, 64), 200, 32, 8, None, 64, id="G7-k>len-bits256-T8"),
    pytest.param(1, 4, 1, 1000, 32, (1000,), 100, 64, 4, 3, 4, id="G4-heavy-ties-T4-inner-loop"),
]


@pytest.mark.parametrize("b,n,kv,s,bits,lengths,kk,block_s,t,distinct,max_blocks", TOPK_CASES)
def test_topk_exact(b, n, kv, s, bits, lengths, kk, block_s, t, distinct, max_blocks):
    gen = rng(s + kk)
    q = random_codes(gen, (b, n, bits // 32))
    k = random_codes(gen, (b, kv, s, bits // 32), distinct)
    lengths = np.asarray(lengths, np.int32)
    ref = hamming_topk_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths), kk)
    _check_topk(ref, q, k, lengths, kk)
    out = hamming_topk(
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(lengths),
        kk,
        implementation="pallas",
        interpret=INTERPRET,
        block_s=block_s,
        num_thresholds=t,
        max_blocks=max_blocks,
    )
    _check_topk(out, q, k, lengths, kk)


def _budget_case(seed):
    """Three rows with their own lengths and live budgets (one above k = 50, which the kernels clamp themselves;
    one above its length; one far below k)."""
    gen = rng(seed)
    b, n, kv, s, bits = 3, 12, 3, 600, 128
    q = random_codes(gen, (b, n, bits // 32))
    k = random_codes(gen, (b, kv, s, bits // 32))
    return q, k, np.array([600, 333, 20], np.int32), np.array([80, 7, 30], np.int32)


def test_topk_budget():
    q, k, lengths, budget = _budget_case(7)
    kk = 50
    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths), kk, jnp.asarray(budget))
    _check_topk(hamming_topk_reference(*args), q, k, lengths, kk, budget)
    out = hamming_topk(*args, implementation="pallas", interpret=INTERPRET, block_s=64, max_blocks=4)
    _check_topk(out, q, k, lengths, kk, budget)


def test_topk_detects_wrong_answer():
    """The checker itself must fail on a non-top selection."""
    gen = rng(3)
    q = random_codes(gen, (1, 2, 4))
    k = random_codes(gen, (1, 1, 100, 4))
    lengths = np.array([100], np.int32)
    idx, scores, valid = hamming_topk_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths), 10)
    worst = np.argsort(scores_np(q, k)[0, 0])[:10]
    bad = (
        jnp.asarray(worst[None, None].astype(np.int32)),
        jnp.asarray(scores_np(q, k)[0, 0, worst][None, None]),
        valid,
    )
    with pytest.raises(AssertionError):
        _check_topk(bad, q, k, lengths, 10)


@pytest.mark.parametrize(
    "s,rows,given,one_launch,want",
    [
        (131072, 4, (None, None), None, (512, 4)),  # Qwen b1 128K: three launches, 2048-token spans
        (32768, 4, (None, None), None, (512, 4)),  # Qwen b1 32K
        (4097, 4, (None, None), None, (512, 4)),  # the default-grid test case above
        (524288, 4, (None, None), None, (1024, 8)),  # Qwen b1 512K: 8192-token spans
        (32768, 8, (None, None), None, (1024, 8)),  # Llama b1 32K: the 512-token plan has 512 programs (one launch)
        (32768, 8, (None, None), False, (512, 4)),  # ... unless the caller keeps three launches
        (131072, 4, (None, None), True, (1024, 8)),  # one launch forced
        (131072, 32, (None, None), None, (1024, 8)),  # Qwen b8 128K: one launch
        (131072, 4, (256, None), None, (256, 8)),  # a caller's setting keeps the plain default for the other
        (131072, 4, (None, 2), None, (1024, 2)),
    ],
)
def test_default_grid_rule(s, rows, given, one_launch, want):
    assert default_grid(s, rows, *given, one_launch=one_launch) == want


@pytest.mark.parametrize("num_scores,t", [(33, 32), (897, 32), (2049, 32), (897, 16), (65, 4)])
def test_level_plan_ends_with_unit_step(num_scores, t):
    steps = level_steps(num_scores, t)
    assert steps[-1] == 1
    w = num_scores
    for st in steps:
        assert (t - 1) * st >= w  # the pass's thresholds cover the whole candidate range
        w = st


# (batch, N, K, S, bits, lengths, k, block_s, max blocks, warps, pass1_depth, depth): the group loops of
# every pass (more steps per program than loads in flight), the one-step prefetch, several scores per
# thread and step (block_s * 2 / (32 * warps) lanes), and counts extracted per threshold (a lane counts
# > 255 tokens).
STREAM_CASES = [
    pytest.param(2, 8, 2, 2000, 64, (2000, 777), 50, 32, 1, 1, None, 4, id="group-loops-word-counts-2lanes"),
    pytest.param(1, 12, 3, 1500, 128, (1333,), 60, 64, 4, 1, 1, 1, id="depth1-4lanes"),
    pytest.param(2, 6, 2, 700, 64, (700, 301), 33, 32, 2, 8, 2, 2, id="depth2-ragged-1lane"),
]


@pytest.mark.parametrize("b,n,kv,s,bits,lengths,kk,block_s,max_blocks,warps,pass1_depth,depth", STREAM_CASES)
def test_topk_stream_variants(b, n, kv, s, bits, lengths, kk, block_s, max_blocks, warps, pass1_depth, depth):
    gen = rng(s + 7 * kk)
    q = random_codes(gen, (b, n, bits // 32))
    k = random_codes(gen, (b, kv, s, bits // 32))
    lengths = np.asarray(lengths, np.int32)
    idx, sc, nv = hamming_topk_rows(
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(lengths),
        jnp.full((b,), kk, jnp.int32),
        k=kk,
        block_s=block_s,
        max_blocks=max_blocks,
        num_warps=warps,
        pass1_depth=pass1_depth,
        depth=depth,
        interpret=INTERPRET,
    )
    out = _rows_out(idx, sc, nv, b, kv, kk)
    _check_topk(out, q, k, lengths, kk)


# The one-launch kernel on the same cases (ragged rows, several levels, ties, k > length, inner loops). In
# interpret mode the programs run in id order, so every wait must succeed at its first poll (max_spins = 1): a
# pass that read another pass's output before it was written would show as a stall.
ONE_LAUNCH_IDS = ("ragged-G3", "qwen-4097", "G1-k=len-ties", "G7-k>len-bits256-T8", "G4-heavy-ties-T4-inner-loop")
ONE_LAUNCH_CASES = [p for p in TOPK_CASES if p.id in ONE_LAUNCH_IDS]  # G7 / 256 bits / T = 8: 3 levels


@pytest.mark.parametrize("b,n,kv,s,bits,lengths,kk,block_s,t,distinct,max_blocks", ONE_LAUNCH_CASES)
def test_topk_one_launch_exact(b, n, kv, s, bits, lengths, kk, block_s, t, distinct, max_blocks):
    gen = rng(s + kk)
    q = random_codes(gen, (b, n, bits // 32))
    k = random_codes(gen, (b, kv, s, bits // 32), distinct)
    lengths = np.asarray(lengths, np.int32)
    assert len(level_steps((n // kv) * bits + 1, min(t, 31))) >= 2
    idx, sc, nv, stalls = hamming_topk_rows_stats(
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(lengths),
        jnp.full((b,), kk, jnp.int32),
        k=kk,
        block_s=block_s,
        num_thresholds=t,
        max_blocks=max_blocks,
        one_launch=True,
        max_spins=1 if INTERPRET else MAX_SPINS,
        interpret=INTERPRET,
    )
    assert int(stalls) == 0
    out = _rows_out(idx, sc, nv, b, kv, kk)
    _check_topk(out, q, k, lengths, kk)


def test_topk_one_launch_budget():
    q, k, lengths, budget = _budget_case(8)
    kk = 50
    idx, sc, nv, stalls = hamming_topk_rows_stats(
        *(jnp.asarray(x) for x in (q, k, lengths, budget)),
        k=kk,
        block_s=64,
        max_blocks=4,
        one_launch=True,
        max_spins=1 if INTERPRET else MAX_SPINS,
        interpret=INTERPRET,
    )
    assert int(stalls) == 0
    out = _rows_out(idx, sc, nv, *k.shape[:2], kk)
    _check_topk(out, q, k, lengths, kk, budget)


def test_wait_count_reports_a_stall():
    """A wait whose producers never arrive gives up after max_spins polls and counts a stall (no hang); one whose
    target is met does not."""

    def kernel(c_ref, o_ref):
        del c_ref
        sync_count(o_ref, (0, 0), INTERPRET)  # slot (0, 0) has one arrival
        wait_count(o_ref, (0, 0), 1, (1, 0), INTERPRET, max_spins=4)  # met
        wait_count(o_ref, (0, 1), 1, (1, 0), INTERPRET, max_spins=4)  # never met: one stall

    zeros = jnp.zeros((2, 2), jnp.int32)
    out = pl.pallas_call(
        kernel,
        grid=(1,),
        out_shape=jax.ShapeDtypeStruct((2, 2), jnp.int32),
        input_output_aliases={0: 0},
        interpret=INTERPRET,
    )(zeros)
    assert int(out[1, 0]) == 1
