"""Bradley–Terry ranking loss for hash training, oracle top sets and ranking metrics (DESIGN.md §1).

For a sampled query i of one query head, the oracle top set T_i is the top `keep_ratio` share of the causally
valid keys j <= pos_i by the true logit q_i . k_j (at least `min_top`, at most all valid keys). With draft scores
`s_ij = softsign(gamma h(q_i)) . softsign(gamma h(k_j))`, the loss of query i is

    mean over (t in T_i, o not in T_i, o <= pos_i) of  -log sigmoid(beta (s_it - s_io) - margin)

and the step's loss is the mean of that over sampled (batch row, query head, query) with at least one pair.
To bound memory, at most `max_queries` queries (per batch row), `max_top` top keys and `max_other` other keys per
query are used; when a limit is at least the full set, the full set is used (exact), else keys are drawn uniformly
with replacement (others that land in T_i are dropped), which keeps the estimate unbiased and avoids a top-k.

Axis legend: B batch, Q sampled queries, S kv len, N q-heads, K kv-heads, G group, H head_dim, C code bits,
P top keys per query, O other keys per query.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from spotlight_jax.config import keep_budget
from spotlight_jax.retrieval import group_softmax


@dataclasses.dataclass(frozen=True)
class LossConfig:
    gamma: float = 64.0  # softsign sharpness of the relaxed codes
    beta: float = 1.0  # Bradley–Terry temperature
    margin: float = 0.0
    keep_ratio: float = 0.02  # oracle top share
    min_top: int = 1  # oracle top set has at least this many keys
    max_queries: int = 1024  # sampled queries per batch row
    max_top: int = 1024  # top keys per query
    max_other: int = 1024  # other keys per query
    # Share of the other keys drawn from the near misses (true-logit ranks just below the top set, up to
    # `hard_span` x the top count) instead of uniformly: the pairs that decide a top-k boundary. 0 = the paper's
    # uniform sampling.
    hard_other_fraction: float = 0.0
    hard_span: int = 5
    min_query_position: int = 0  # queries are drawn from positions >= this (0 = anywhere)
    # What is ranked. "head" (the paper): per query head, T_i = top keys by that head's logit, draft = that head's
    # code similarity. "group" (what decoding selects): per KV head, T_i = top keys by the group-summed softmax
    # (the recall oracle), draft = the group-summed code similarity (the decoder's score).
    targets: str = "head"
    # Weight of a top key t in its query's pairs: p_t ** top_weight_power, normalised to mean 1 over the query's
    # sampled top keys, with p the true attention (the head's softmax; group targets: the group-summed softmax).
    # 0 = every top key counts the same (the paper). > 0 puts the keys that carry attention mass first, e.g. the
    # attention sink, which holds ~23 % of SmolLM2's attention and whose loss costs the most perplexity: with 16 x 8K
    # samples a = 1 gave decode-path perplexity +14.6 % instead of +33.3 %, recall@2 % unchanged; with the CPU default
    # run's 12 x 2K samples it cost recall (0.634 -> 0.602). Default 0 (the paper); README has the figures.
    top_weight_power: float = 0.0
    query_chunk: int = 128  # queries per pairwise chunk (bounds the [chunk, P, O] pair tensor; rematerialised)

    def __post_init__(self):
        if self.targets not in ("head", "group"):
            raise ValueError(f"targets must be 'head' or 'group', got {self.targets!r}")
        if not self.top_weight_power >= 0:
            raise ValueError(f"top_weight_power must be >= 0, got {self.top_weight_power}")


def oracle_top_counts(q_pos: jax.Array, keep_ratio: float, min_top: int = 1) -> jax.Array:
    """|T_i| = clip(ceil(keep_ratio * (pos_i + 1)), min_top, pos_i + 1). q_pos: int [...] -> int32 [...]."""
    valid = q_pos.astype(jnp.int32) + 1
    return jnp.minimum(keep_budget(valid, keep_ratio, min_top, slack=1e-4), valid)


def max_top_count(seq_len: int, keep_ratio: float, min_top: int = 1) -> int:
    """Static upper bound of `oracle_top_counts` over positions < seq_len."""
    return min(seq_len, keep_budget(seq_len, keep_ratio, min_top))


def causal_logits(q: jax.Array, k: jax.Array, q_pos: jax.Array) -> jax.Array:
    """True causal logits per query head with -inf where j > pos_i.

    q: [B, N, Q, H], k: [B, K, S, H], q_pos: int [B, Q] -> float32 [B, N, Q, S]
    """
    b, n, nq, h = q.shape
    kk, s = k.shape[1], k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, kk, n // kk, nq, h)
    logits = jnp.einsum("bkgqh,bksh->bkgqs", qg, k.astype(jnp.float32)).reshape(b, n, nq, s)
    causal = jnp.arange(s)[None, None, None, :] <= q_pos[:, None, :, None]  # [B, 1, Q, S]
    return jnp.where(causal, logits, -jnp.inf)


def oracle_top_sets(logits: jax.Array, q_pos: jax.Array, keep_ratio: float, min_top: int = 1):
    """Oracle top set of every row of causally-masked logits.

    logits: [..., Q, S] (-inf at j > pos), q_pos: int broadcastable to [..., Q]
    -> top_idx int32 [..., Q, P] (P = max_top_count(S)), top_valid bool [..., Q, P], in_top bool [..., Q, S]
    """
    s = logits.shape[-1]
    p = max_top_count(s, keep_ratio, min_top)
    _, top_idx = jax.lax.top_k(logits, p)
    counts = oracle_top_counts(jnp.broadcast_to(q_pos, logits.shape[:-1]), keep_ratio, min_top)  # [..., Q]
    top_valid = jnp.arange(p) < counts[..., None]
    rows = top_idx.reshape(-1, p)
    in_top = jax.vmap(lambda i, v: jnp.zeros((s,), jnp.bool_).at[i].max(v))(rows, top_valid.reshape(-1, p))
    return top_idx.astype(jnp.int32), top_valid, in_top.reshape(logits.shape)


def sample_query_positions(key: jax.Array, batch: int, seq_len: int, num: int, min_position: int = 0) -> jax.Array:
    """`num` distinct query positions per batch row in [min_position, seq_len) -> int32 [B, Q] (sorted)."""
    lo = min(min_position, seq_len - 1)
    avail = seq_len - lo
    num = min(num, avail)
    keys = jax.random.split(key, batch)
    pos = jax.vmap(lambda k: jax.random.choice(k, avail, (num,), replace=False))(keys) + lo
    return jnp.sort(pos, axis=-1).astype(jnp.int32)


def sample_pair_keys(key: jax.Array, q_pos: jax.Array, top_idx, top_valid, in_top, cfg: LossConfig):
    """Top and other key indices per query (exact sets when the limits allow, else uniform with replacement).

    q_pos: int [B, Q]; top_idx/top_valid: [B, N, Q, P]; in_top: bool [B, N, Q, S]
    -> (t_idx [B, N, Q, P'], t_valid, o_idx [B, N, Q, O], o_valid)
    """
    s, p = in_top.shape[-1], top_idx.shape[-1]
    kt, ko = jax.random.split(key)
    pos = q_pos[:, None, :, None]  # [B, 1, Q, 1]
    if cfg.max_top >= p:
        t_idx, t_valid = top_idx, top_valid
    else:
        counts = jnp.sum(top_valid, axis=-1, keepdims=True)  # [B, N, Q, 1]
        u = jax.random.uniform(kt, top_idx.shape[:-1] + (cfg.max_top,))
        slot = jnp.minimum((u * counts).astype(jnp.int32), counts - 1)
        t_idx = jnp.take_along_axis(top_idx, slot, axis=-1)
        t_valid = jnp.broadcast_to(counts > 0, t_idx.shape)
    if cfg.max_other >= s:
        o_idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), in_top.shape)
        o_valid = (o_idx <= pos) & ~in_top
    else:
        u = jax.random.uniform(ko, in_top.shape[:-1] + (cfg.max_other,))
        o_idx = jnp.minimum((u * (pos + 1)).astype(jnp.int32), pos)  # uniform over causally valid keys
        o_valid = ~jnp.take_along_axis(in_top, o_idx, axis=-1)
    return t_idx, t_valid, o_idx, o_valid


def near_miss_keys(key: jax.Array, logits: jax.Array, top_valid: jax.Array, num: int, span: int):
    """`num` keys per query drawn uniformly from the true-logit ranks [|T_i|, span * |T_i|) (the near misses).

    logits: [..., Q, S] causally masked; top_valid: [..., Q, P] -> (idx int32 [..., Q, num], valid bool)
    """
    s, p = logits.shape[-1], top_valid.shape[-1]
    m = min(s, span * p)
    vals, ranked = jax.lax.top_k(logits, m)  # [..., Q, m]
    counts = jnp.sum(top_valid, axis=-1, keepdims=True)  # |T_i|
    hi = jnp.minimum(span * counts, m)
    u = jax.random.uniform(key, logits.shape[:-1] + (num,))
    slot = jnp.minimum(counts + (u * (hi - counts)).astype(jnp.int32), m - 1)
    valid = (hi > counts) & jnp.isfinite(jnp.take_along_axis(vals, slot, axis=-1))  # causally valid ranks only
    return jnp.take_along_axis(ranked, slot, axis=-1).astype(jnp.int32), valid


def _chunked(fn, arrays, chunk: int):
    """Apply `fn` to row chunks of [R, ...] arrays with lax.map (bounded memory); outputs are per-row [R, ...]."""
    r = arrays[0].shape[0]
    if not chunk or chunk >= r:
        return fn(*arrays)
    pad = (-r) % chunk  # padded rows carry no valid pairs
    padded = [jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)) for x in arrays]
    chunks = tuple(x.reshape((r + pad) // chunk, chunk, *x.shape[1:]) for x in padded)
    out = jax.lax.map(lambda a: fn(*a), chunks)
    return jax.tree.map(lambda x: x.reshape((r + pad,) + x.shape[2:])[:r], out)


def _pair_terms(st, tw, so, ov, beta, margin):
    d = beta * (st[:, :, None] - so[:, None, :]) - margin  # [r, P, O]
    w = tw[:, :, None] * ov[:, None, :].astype(jnp.float32)  # top weight (0 = invalid) x other validity
    return d, w


def _bt_forward_rows(st, tw, so, ov, beta, margin):
    d, wf = _pair_terms(st, tw, so, ov, beta, margin)
    # -log sigmoid(d) = softplus(-d), written out so XLA fuses it into one pass over the pairs.
    nll = jnp.maximum(-d, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(d)))
    diff = st[:, :, None] - so[:, None, :]
    wrong = jnp.where(diff < 0, 1.0, jnp.where(diff == 0, 0.5, 0.0))
    return jnp.sum(nll * wf, axis=(1, 2)), jnp.sum(wrong * wf, axis=(1, 2)), jnp.sum(wf, axis=(1, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _bt_sums(s_top, t_valid, s_other, o_valid, beta, margin, chunk):
    return _chunked(lambda *a: _bt_forward_rows(*a, beta, margin), (s_top, t_valid, s_other, o_valid), chunk)


def _bt_sums_fwd(s_top, t_valid, s_other, o_valid, beta, margin, chunk):
    out = _bt_sums(s_top, t_valid, s_other, o_valid, beta, margin, chunk)
    return out, (s_top, t_valid, s_other, o_valid)  # only the [R, P] / [R, O] inputs are kept, never the pairs


def _bt_sums_bwd(beta, margin, chunk, res, cts):
    s_top, t_valid, s_other, o_valid = res
    ct = cts[0]  # only the loss sum is differentiable (wrong / pairs are counts)

    def rows(st, tv, so, ov, c):
        d, w = _pair_terms(st, tv, so, ov, beta, margin)
        g = w * -jax.nn.sigmoid(-d) * (beta * c)[:, None, None]  # d(loss)/d(s_t - s_o)
        return jnp.sum(g, axis=2), -jnp.sum(g, axis=1)

    d_top, d_other = _chunked(rows, (s_top, t_valid, s_other, o_valid, ct), chunk)
    return d_top, None, d_other, None


_bt_sums.defvjp(_bt_sums_fwd, _bt_sums_bwd)


def pairwise_bt(s_top, t_valid, s_other, o_valid, beta: float = 1.0, margin: float = 0.0, chunk: int = 0):
    """Per-query Bradley–Terry sums from gathered draft scores, with a hand-written VJP (no pair tensor is stored).

    s_top: [R, P], t_valid: bool [R, P] or float top weights (0 = invalid), s_other: [R, O], o_valid: bool [R, O]
    (R = any flattened rows) -> (loss_sum [R], wrong [R] mis-ordered pairs (ties count 1/2), pairs [R]), each pair
    counted with its top key's weight.
    """
    return _bt_sums(
        s_top.astype(jnp.float32), t_valid.astype(jnp.float32), s_other.astype(jnp.float32), o_valid, float(beta),
        float(margin), int(chunk),
    )  # fmt: skip


def bradley_terry_loss(
    hash_module,
    q: jax.Array,
    k: jax.Array,
    key: jax.Array,
    cfg: LossConfig = LossConfig(),
    q_pos: jax.Array | None = None,
):
    """Sampled Bradley–Terry loss of one layer's hash module on a batch of cached activations.

    q: [B, N, T, H], k: [B, K, T, H] (post-RoPE, any float dtype), key: PRNG key, q_pos: optional int [B, Q]
    -> (loss scalar, metrics dict: ranking_error, pairs, queries)
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q [B, N, T, H] and k [B, K, T, H] with matching B, T, H; got {q.shape}, {k.shape}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of KV heads {k.shape[1]}")
    b, n, t, _ = q.shape
    kq, ks = jax.random.split(key)
    if q_pos is None:
        q_pos = sample_query_positions(kq, b, t, cfg.max_queries, cfg.min_query_position)  # [B, Q]
    q_sel = jnp.take_along_axis(q, q_pos[:, None, :, None], axis=2)  # [B, N, Q, H]

    kk = k.shape[1]
    logits = causal_logits(q_sel, k, q_pos)  # [B, N, Q, S]
    probs = None  # true attention [B, N or K, Q, S], where a loss option needs it
    if cfg.targets == "group":  # rank by the group-summed softmax, as the oracle the decoder is measured against
        grouped = (logits / math.sqrt(q.shape[3])).reshape(b, kk, n // kk, *logits.shape[2:])  # [B, K, G, Q, S]
        probs = group_softmax(grouped)  # [B, K, Q, S]
        logits = jnp.where(jnp.isfinite(logits[:, :: n // kk]), probs, -jnp.inf)
    elif cfg.top_weight_power:
        probs = jax.nn.softmax(logits / math.sqrt(q.shape[3]), axis=-1)  # [B, N, Q, S]
    top_idx, top_valid, in_top = oracle_top_sets(logits, q_pos[:, None, :], cfg.keep_ratio, cfg.min_top)
    t_idx, t_valid, o_idx, o_valid = sample_pair_keys(ks, q_pos, top_idx, top_valid, in_top, cfg)
    t_weight = t_valid
    if cfg.top_weight_power:  # attention-mass weights of the top keys, mean 1 over each query's valid ones
        pw = jnp.where(t_valid, jnp.take_along_axis(probs, t_idx, axis=-1) ** cfg.top_weight_power, 0.0)
        count = jnp.sum(t_valid, axis=-1, keepdims=True)
        t_weight = pw * count / jnp.maximum(jnp.sum(pw, axis=-1, keepdims=True), 1e-30)
    n_hard = round(cfg.hard_other_fraction * o_idx.shape[-1])
    if n_hard:  # replace the last n_hard uniform others by near misses
        h_idx, h_valid = near_miss_keys(jax.random.fold_in(ks, 1), logits, top_valid, n_hard, cfg.hard_span)
        o_idx = jnp.concatenate([o_idx[..., :-n_hard], h_idx], axis=-1)
        o_valid = jnp.concatenate([o_valid[..., :-n_hard], h_valid], axis=-1)

    qs = hash_module.soft_query_codes(q_sel, cfg.gamma)  # [B, N, Q, C]
    kc = hash_module.soft_key_codes(k, cfg.gamma)  # [B, K, S, C]
    qs = qs.reshape(b, kk, n // kk, *qs.shape[2:])  # [B, K, G, Q, C]
    if cfg.targets == "group":
        draft = jnp.einsum("bkgqc,bksc->bkqs", qs, kc)  # [B, K, Q, S]: the decoder's group-summed score
    else:
        draft = jnp.einsum("bkgqc,bksc->bkgqs", qs, kc).reshape(logits.shape)  # [B, N, Q, S]
    s_top = jnp.take_along_axis(draft, t_idx, axis=-1)  # [B, N or K, Q, P]
    s_other = jnp.take_along_axis(draft, o_idx, axis=-1)  # [B, N or K, Q, O]

    flat = lambda x: x.reshape(-1, x.shape[-1])
    loss_sum, wrong, pairs = pairwise_bt(
        flat(s_top), flat(t_weight), flat(s_other), flat(o_valid), cfg.beta, cfg.margin, cfg.query_chunk
    )
    has = pairs > 0
    per_query = jnp.where(has, loss_sum / jnp.maximum(pairs, 1.0), 0.0)
    num_q = jnp.sum(has)
    loss = jnp.sum(per_query) / jnp.maximum(num_q, 1)
    metrics = {
        "ranking_error": jnp.sum(wrong) / jnp.maximum(jnp.sum(pairs), 1.0),
        "pairs": jnp.sum(pairs),
        "queries": num_q,
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# Evaluation helpers: group-aggregated oracle and overlap metrics (used by spotlight_jax.eval.recall)
# ----------------------------------------------------------------------------------------------------------------


def group_attention(q: jax.Array, k: jax.Array, q_pos: jax.Array) -> jax.Array:
    """Causal softmax attention summed over each KV head's G query heads.

    q: [B, N, Q, H], k: [B, K, S, H], q_pos: int [B, Q] -> float32 [B, K, Q, S] (0 at j > pos)
    """
    b, n, nq, h = q.shape
    kk = k.shape[1]
    logits = causal_logits(q, k, q_pos) / math.sqrt(h)  # [B, N, Q, S], -inf at j > pos
    return group_softmax(logits.reshape(b, kk, n // kk, nq, -1))


def topk_mask(scores: jax.Array, q_pos: jax.Array, keep_ratio: float, min_keep: int, seed: int | None = None):
    """Per row, the decoder's budget max(min_keep, ceil(keep_ratio * (pos+1))) best causally-valid keys.

    scores: [..., Q, S] (any dtype; higher = better), q_pos: int broadcastable to [..., Q]
    -> bool [..., Q, S]. Ties are broken by a fixed random order when `seed` is given (integer Hamming scores tie
    a lot; breaking them by position would favour one end of the sequence), else by position.
    """
    s = scores.shape[-1]
    pos = jnp.broadcast_to(q_pos, scores.shape[:-1])
    causal = jnp.arange(s) <= pos[..., None]
    x = scores.astype(jnp.float32)
    if seed is not None:
        # Tie-break with a tiny random offset smaller than any score gap (integer scores differ by >= 1).
        x = x + 0.5 * jax.random.uniform(jax.random.key(seed), x.shape)
    x = jnp.where(causal, x, -jnp.inf)
    budget = oracle_top_counts(pos, keep_ratio, min_keep)  # the decoder's budget, at most the pos + 1 valid keys
    kmax = max_top_count(s, keep_ratio, min_keep)
    _, idx = jax.lax.top_k(x, kmax)
    valid = jnp.arange(kmax) < budget[..., None]
    rows = idx.reshape(-1, kmax)
    sel = jax.vmap(lambda i, v: jnp.zeros((s,), jnp.bool_).at[i].max(v))(rows, valid.reshape(-1, kmax))
    return sel.reshape(scores.shape)
