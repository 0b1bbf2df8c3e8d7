"""Bradley–Terry loss, oracle top sets and ranking error against direct NumPy implementations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spotlight_jax.hashing import SpotlightHash
from spotlight_jax.losses import (
    LossConfig,
    bradley_terry_loss,
    group_attention,
    oracle_top_counts,
    oracle_top_sets,
    sample_query_positions,
    topk_mask,
)

B, N, K, T, H, C = 2, 4, 2, 37, 8, 32
G = N // K


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, N, T, H)).astype(np.float32)
    k = rng.standard_normal((B, K, T, H)).astype(np.float32)
    return q, k


def _np_mlp(x, ws, bs, residual=True):
    """x: [M, H] one head; ws/bs: that head's weights (float64)."""
    y = x.astype(np.float64)
    for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
        z = y @ w + b
        if i == 0:
            z = z / (1.0 + np.exp(-z))
        y = y + z if (residual and z.shape[-1] == y.shape[-1]) else z
    return y


def _np_softmax(x):
    e = np.exp(x - np.max(x))
    return e / np.sum(e)


def _np_loss(q, k, ws, bs, keep_ratio, gamma, beta, margin=0.0, targets="head", power=0.0):
    """Direct NumPy Bradley–Terry loss over every query, every exact (top, other) pair; also the ranking error.

    targets="head": one ranking per query head (its logits, its code similarity); "group": one per KV head (the
    group-summed softmax, the group-summed code similarity). power > 0: a pair counts with weight p_t ** power of its
    top key (p: the head's softmax, or the group-summed one), normalised to mean 1 over the query's top keys."""
    softsign = lambda x: x / (1 + np.abs(x))
    per_query, wrong, pairs = [], 0.0, 0
    for b in range(B):
        for row in range(N if targets == "head" else K):
            kh = row // G if targets == "head" else row
            heads = [row] if targets == "head" else list(range(kh * G, (kh + 1) * G))
            mlp = lambda x: softsign(gamma * _np_mlp(x, [w[kh] for w in ws], [x_[kh] for x_ in bs]))  # noqa: B023
            qs = [mlp(q[b, n]) for n in heads]  # [T, C] each
            ks = mlp(k[b, kh])  # [T, C]
            for i in range(T):
                kk = k[b, kh, : i + 1].astype(np.float64)
                logits = [kk @ q[b, n, i].astype(np.float64) for n in heads]
                rank = logits[0] if targets == "head" else sum(_np_softmax(x / math.sqrt(H)) for x in logits)
                n_top = min(i + 1, max(1, math.ceil(round(keep_ratio * (i + 1), 9))))
                order = np.argsort(-rank, kind="stable")
                top, other = order[:n_top], order[n_top:]
                if len(other) == 0:
                    continue
                s = sum(ks[: i + 1] @ x[i] for x in qs)
                d = beta * (s[top][:, None] - s[other][None, :]) - margin
                probs = sum(_np_softmax(x / math.sqrt(H)) for x in logits)
                w = probs[top] ** power if power else np.ones(len(top))
                w = np.broadcast_to((w / w.mean())[:, None], d.shape)
                per_query.append(np.sum(w * np.logaddexp(0.0, -d)) / np.sum(w))
                diff = s[top][:, None] - s[other][None, :]
                wrong += np.sum(w * (diff < 0)) + 0.5 * np.sum(w * (diff == 0))
                pairs += np.sum(w)
    return float(np.mean(per_query)), wrong / pairs


@pytest.fixture(scope="module")
def setup():
    q, k = _inputs()
    h = SpotlightHash(K, H, num_heads=N, bits=C, dims=(H, C, C), init_scale=0.3, rngs=nnx.Rngs(1))
    # non-zero biases so they are exercised too
    for b in h.key_mlp.biases:
        b[...] = 0.1 * jax.random.normal(jax.random.key(3), b[...].shape)
    cfg = LossConfig(
        gamma=0.7, beta=1.3, keep_ratio=0.1, max_queries=T, max_top=T, max_other=T, query_chunk=16, top_weight_power=0.0
    )
    return q, k, h, cfg


def _np_params(h):
    ws = [np.asarray(w[...], np.float64) for w in h.key_mlp.weights]
    bs = [np.asarray(b[...], np.float64) for b in h.key_mlp.biases]
    return ws, bs


def test_loss_matches_numpy(setup):
    q, k, h, cfg = setup
    q_pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    loss, metrics = bradley_terry_loss(h, jnp.asarray(q), jnp.asarray(k), jax.random.key(0), cfg, q_pos=q_pos)
    ws, bs = _np_params(h)
    ref_loss, ref_err = _np_loss(q, k, ws, bs, cfg.keep_ratio, cfg.gamma, cfg.beta)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["ranking_error"]), ref_err, rtol=1e-5, atol=1e-6)
    # chunked and unchunked pairwise paths agree
    loss2, _ = bradley_terry_loss(
        h, jnp.asarray(q), jnp.asarray(k), jax.random.key(0), LossConfig(**{**cfg.__dict__, "query_chunk": 0}), q_pos
    )
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)


@pytest.mark.parametrize("power", [0.0, 0.7])
def test_gradient_matches_numpy(setup, power):
    """The hand-written VJP against central differences of the NumPy loss (also with attention-weighted tops)."""
    q, k, h, cfg = setup
    cfg = LossConfig(**{**cfg.__dict__, "top_weight_power": power})
    q_pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    graphdef, params = nnx.split(h, nnx.Param)

    def f(p):
        return bradley_terry_loss(
            nnx.merge(graphdef, p), jnp.asarray(q), jnp.asarray(k), jax.random.key(0), cfg, q_pos
        )[0]

    grads = jax.jit(jax.grad(f))(params)
    flat_g, treedef = jax.tree.flatten(grads)
    flat_p = jax.tree.leaves(params)
    rng = np.random.default_rng(5)
    eps = 1e-5
    for _ in range(3):  # directional derivatives along random directions, central differences in float64
        dirs = [rng.standard_normal(np.shape(x)) for x in flat_p]
        analytic = sum(float(np.sum(np.asarray(g, np.float64) * d)) for g, d in zip(flat_g, dirs, strict=True))

        def np_f(sign, dirs=dirs):
            shifted = [np.asarray(x, np.float64) + sign * eps * d for x, d in zip(flat_p, dirs, strict=True)]
            tree = jax.tree.unflatten(treedef, shifted)
            ws = [np.asarray(tree["key_mlp"]["weights"][i]) for i in range(2)]
            bs = [np.asarray(tree["key_mlp"]["biases"][i]) for i in range(2)]
            return _np_loss(q, k, ws, bs, cfg.keep_ratio, cfg.gamma, cfg.beta, power=power)[0]

        numeric = (np_f(1) - np_f(-1)) / (2 * eps)
        np.testing.assert_allclose(analytic, numeric, rtol=2e-3, atol=1e-6)


def test_oracle_top_sets():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 60)).astype(np.float32)
    pos = np.array([0, 30, 59])
    masked = np.where(np.arange(60)[None] <= pos[:, None], logits, -np.inf)
    idx, valid, in_top = oracle_top_sets(jnp.asarray(masked), jnp.asarray(pos), 0.05, 1)
    for r, p in enumerate(pos):
        n_top = max(1, math.ceil(round(0.05 * (p + 1), 9)))
        ref = set(np.argsort(-masked[r])[:n_top].tolist())
        assert set(np.asarray(idx[r])[np.asarray(valid[r])].tolist()) == ref
        assert set(np.nonzero(np.asarray(in_top[r]))[0].tolist()) == ref
    np.testing.assert_array_equal(oracle_top_counts(jnp.array([0, 49, 50, 99]), 0.02), [1, 1, 2, 2])


@pytest.mark.parametrize("targets", ["head", "group"])
def test_attention_weighted_tops_match_numpy(setup, targets):
    """top_weight_power: each pair counts with its top key's true attention ** power (mean 1 per query)."""
    q, k, h, cfg = setup
    cfg = LossConfig(**{**cfg.__dict__, "targets": targets, "top_weight_power": 0.7})
    q_pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    loss, metrics = bradley_terry_loss(h, jnp.asarray(q), jnp.asarray(k), jax.random.key(0), cfg, q_pos=q_pos)
    ref_loss, ref_err = _np_loss(
        q, k, *_np_params(h), cfg.keep_ratio, cfg.gamma, cfg.beta, targets=targets, power=cfg.top_weight_power
    )
    np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["ranking_error"]), ref_err, rtol=1e-5, atol=1e-6)
    unweighted, _ = bradley_terry_loss(h, jnp.asarray(q), jnp.asarray(k), jax.random.key(0), LossConfig(
        **{**cfg.__dict__, "top_weight_power": 0.0}), q_pos=q_pos)  # fmt: skip
    assert abs(float(unweighted) - float(loss)) > 1e-4  # the weights change the loss
    with pytest.raises(ValueError, match="top_weight_power"):
        LossConfig(top_weight_power=-1.0)


def test_group_targets_loss_matches_numpy(setup):
    """targets="group" ranks per KV head by the group-summed softmax against the group-summed code similarity."""
    q, k, h, cfg = setup
    cfg = LossConfig(**{**cfg.__dict__, "targets": "group"})
    q_pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    loss, metrics = bradley_terry_loss(h, jnp.asarray(q), jnp.asarray(k), jax.random.key(0), cfg, q_pos=q_pos)
    ref_loss, ref_err = _np_loss(q, k, *_np_params(h), cfg.keep_ratio, cfg.gamma, cfg.beta, targets="group")
    np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["ranking_error"]), ref_err, rtol=1e-5, atol=1e-6)
    head_loss, _ = bradley_terry_loss(h, jnp.asarray(q), jnp.asarray(k), jax.random.key(0), cfg.__class__(
        **{**cfg.__dict__, "targets": "head"}), q_pos=q_pos)  # fmt: skip
    assert abs(float(head_loss) - float(loss)) > 1e-4  # a different objective (G = 2 here)
    with pytest.raises(ValueError, match="targets"):
        LossConfig(targets="token")


def test_sampled_loss_is_finite_and_bounded():
    q, k = _inputs(1)
    h = SpotlightHash(K, H, num_heads=N, bits=C, dims=(H, C, C), rngs=nnx.Rngs(0))
    for hard, targets in ((0.0, "head"), (0.4, "head"), (0.4, "group")):
        cfg = LossConfig(
            keep_ratio=0.1, max_queries=8, max_top=2, max_other=5, min_query_position=10, hard_other_fraction=hard,
            targets=targets,
        )  # fmt: skip
        fn = jax.jit(lambda q, k, cfg=cfg: bradley_terry_loss(h, q, k, jax.random.key(1), cfg))
        loss, m = fn(jnp.asarray(q), jnp.asarray(k))
        assert np.isfinite(float(loss)) and 0 <= float(m["ranking_error"]) <= 1
    assert int(m["queries"]) <= B * K * 8  # group targets: one ranking per KV head
    pos = sample_query_positions(jax.random.key(0), 3, 20, 8, 5)
    assert pos.shape == (3, 8) and int(pos.min()) >= 5 and all(len(set(r.tolist())) == 8 for r in np.asarray(pos))


def test_group_attention_and_topk_mask():
    q, k = _inputs(2)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    att = np.asarray(group_attention(jnp.asarray(q), jnp.asarray(k), pos))  # [B, K, T, T]
    np.testing.assert_allclose(att.sum(-1), G, rtol=1e-5)
    assert np.all(att[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0)
    sel = np.asarray(topk_mask(jnp.asarray(att), pos[:, None, :], 0.1, 3))
    counts = sel.sum(-1)
    expect = np.minimum(np.maximum(3, np.ceil(0.1 * (np.arange(T) + 1) - 1e-4)), np.arange(T) + 1)
    np.testing.assert_array_equal(counts, np.broadcast_to(expect, counts.shape))


def test_near_miss_keys_come_from_just_below_the_top_set():
    from spotlight_jax.losses import causal_logits, near_miss_keys, oracle_top_sets

    key = jax.random.PRNGKey(3)
    q = jax.random.normal(key, (1, 2, 5, 8))
    k = jax.random.normal(jax.random.fold_in(key, 1), (1, 2, 300, 8))
    q_pos = jnp.array([[40, 99, 150, 220, 299]], jnp.int32)
    logits = causal_logits(q, k, q_pos)  # [1, 2, 5, 300]
    top_idx, top_valid, in_top = oracle_top_sets(logits, q_pos[:, None, :], 0.02)
    idx, valid = near_miss_keys(jax.random.fold_in(key, 2), logits, top_valid, 64, 5)
    lg, idx, valid, counts = map(np.asarray, (logits, idx, valid, jnp.sum(top_valid, -1)))
    assert valid.any()
    for h in range(2):
        for i in range(5):
            order = np.argsort(-lg[0, h, i], kind="stable")
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            r = rank[idx[0, h, i][valid[0, h, i]]]
            c = counts[0, h, i]
            assert r.min() >= c and r.max() < 5 * c, (r.min(), r.max(), c)
            assert not np.asarray(in_top)[0, h, i, idx[0, h, i][valid[0, h, i]]].any()
            assert np.all(idx[0, h, i][valid[0, h, i]] <= q_pos[0, i])  # causal
