"""Decode-step attention: which cached rows a query reads, and the attention over them.

One entry point, `decode_attention`, picks the method from a static `RetrievalConfig`:
- dense: every live row;
- oracle: exact top-k of the group-aggregated true attention (the upper bound);
- linear / spotlight: top-k by group-summed Hamming similarity of binary codes (LinearHash / trained SpotlightHash);
- quest: top pages by the page-level min/max key bound (Quest, page size 16).

Legend: B batch, N q-heads, K kv-heads, G group, S cache len, H head_dim, W words.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels import decode_attention as pallas_decode_attention
from pallas_kernels import hamming_topk, resolve_implementation, sparse_decode_attention, spotlight_attention
from pallas_kernels.candidate_scores import candidate_scores
from spotlight_jax.config import RetrievalConfig, keep_budget

CODE_METHODS = ("linear", "spotlight")


def live_budget(lengths: jax.Array, cfg: RetrievalConfig, k_max: int) -> jax.Array:
    """[B] number of rows a step may read: `config.keep_budget` of each length, capped by the buffer."""
    return jnp.minimum(keep_budget(lengths, cfg.keep_ratio, cfg.min_keep), k_max)


def dense_decode_attention(q, k_cache, v_cache, lengths, scale, window=None, implementation=None):
    """q [B, N, H], k/v_cache [B, K, S, H], lengths [B] -> [B, N, H] fp32. Rows >= lengths[b] are masked, and with a
    sliding `window` rows at or before lengths[b] - 1 - window. `implementation` "pallas" (the default on GPU) runs the
    flash-decoding kernel (XLA's einsums read the cache at half the bandwidth); "xla" (elsewhere) the einsums below."""
    if resolve_implementation(implementation) == "pallas":
        return pallas_decode_attention(q, k_cache, v_cache, lengths, scale, window=window, implementation="pallas")
    b, n, h = q.shape
    kh, s = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b, kh, n // kh, h)
    logits = jnp.einsum("bkgh,bksh->bkgs", qg, k_cache, preferred_element_type=jnp.float32) * scale
    live = jnp.arange(s)[None, :] < lengths[:, None]  # [B, S]
    if window is not None:
        live &= jnp.arange(s)[None, :] > lengths[:, None] - 1 - window
    logits = jnp.where(live[:, None, None], logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgs,bksh->bkgh", probs.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    return out.reshape(b, n, h)


def group_softmax(logits, live=True):
    """The group-score oracle: true attention summed over each KV head's G query heads.

    logits [B, K, G, ..., S] fp32 (scaled q.k), live bool broadcastable to them (True: masked already, -inf)
    -> [B, K, ..., S] fp32 = the sum over G of the softmax over the live keys. Decoding's `oracle` method ranks by it,
    and so do the recall oracle and the group-target loss (spotlight_jax.losses)."""
    return jnp.sum(jax.nn.softmax(jnp.where(live, logits, -jnp.inf), axis=-1), axis=2)


def group_attention_probs(q, k_cache, lengths, scale):
    """True attention, group-aggregated: [B, K, S] fp32 = sum over each KV head's G query heads of softmax(q.k)."""
    b, n, h = q.shape
    kh, s = k_cache.shape[1], k_cache.shape[2]
    logits = jnp.einsum("bkgh,bksh->bkgs", q.reshape(b, kh, n // kh, h), k_cache, preferred_element_type=jnp.float32)
    live = jnp.arange(s)[None, None, None, :] < lengths[:, None, None, None]
    return group_softmax(logits * scale, live)


def topk_by_score(scores, lengths, k_max, budget):
    """Exact top-`budget` per (b, kv head) of float scores [B, K, S] -> (indices, valid) [B, K, k_max]."""
    s = scores.shape[-1]
    live = jnp.arange(s)[None, None, :] < lengths[:, None, None]
    _, idx = jax.lax.top_k(jnp.where(live, scores, -jnp.inf), k_max)
    valid = _keep_first(jnp.minimum(budget, lengths), k_max, idx.shape)
    return jnp.where(valid, idx, 0).astype(jnp.int32), valid


def mass_budget(sorted_probs, group: int, top_p: float, min_keep: int, budget):
    """Adaptive budget: sorted_probs [B, K, k] group-summed attention in descending order (each of the G query heads
    contributes a softmax summing to 1, so the total is G) -> [B, K] int32 rows to keep, the fewest whose mass
    reaches top_p * G, clipped to [min_keep, budget [B]]."""
    p = jnp.maximum(sorted_probs, 0.0)
    before = jnp.cumsum(p, axis=-1) - p  # mass of the rows ranked above each row
    need = jnp.sum(before < top_p * group, axis=-1).astype(jnp.int32)  # through the row that crosses top_p
    return jnp.clip(need, min_keep, budget[:, None])


def _keep_first(n, k_max: int, shape):
    """[B, K, k_max] bool: the first n [B] or [B, K] slots."""
    n = n[:, None, None] if n.ndim == 1 else n[..., None]
    return jnp.broadcast_to(jnp.arange(k_max)[None, None, :] < n, shape)


def rerank(q, k_cache, candidates, cand_valid, lengths, scale, k_max, budget, implementation=None, *, top_p=1.0,
           min_keep=1):  # fmt: skip
    """Second stage of a two-stage selection: of C candidates per (b, KV head) keep the top-`budget` by exact score.

    candidates / cand_valid [B, K, C] (the Hamming top-(R * k)) -> (indices, valid) [B, K, k_max]. The score is the
    oracle's (`group_softmax`: attention summed over the group's G query heads), normalised over the candidates; so
    with candidates covering every live row the result is the oracle's selection. Only the candidates' K rows are
    read (`pallas_kernels.candidate_scores`). `top_p` < 1: the adaptive budget (`mass_budget`) over the candidates.
    """
    logits = candidate_scores(q, k_cache, candidates, cand_valid, scale, implementation=implementation)  # [B,K,G,C]
    probs = group_softmax(logits)  # [B, K, C]; NaN for a row without candidates (it keeps no slot either)
    probs = jnp.where(cand_valid & ~jnp.isnan(probs), probs, -1.0)
    top_probs, top = jax.lax.top_k(probs, k_max)  # [B, K, k_max], descending
    indices = jnp.take_along_axis(candidates, top, axis=-1)
    # The first min(budget, length) candidates by score are valid ones: there are min(R * budget, length) of those.
    keep = jnp.minimum(budget, lengths)
    if top_p < 1.0:
        keep = jnp.minimum(mass_budget(top_probs, logits.shape[2], top_p, min_keep, budget), lengths[:, None])
    valid = _keep_first(keep, k_max, indices.shape)
    return jnp.where(valid, indices, 0).astype(jnp.int32), valid


def quest_select(q, k_cache, lengths, k_max, budget, page):
    """Quest: rank pages of `page` tokens by the upper bound sum_h max(q_h min_h, q_h max_h) of q.k on the page
    (summed over the group's query heads), keep the top ceil(budget / page) pages -> (indices, valid)."""
    b, n, h = q.shape
    kh, s = k_cache.shape[1], k_cache.shape[2]
    pages = s // page
    kp = k_cache[:, :, : pages * page].reshape(b, kh, pages, page, h).astype(jnp.float32)
    pos = jnp.arange(pages * page).reshape(pages, page)
    live = (pos[None] < lengths[:, None, None])[:, None, :, :, None]  # [B, 1, P, page, 1]
    kmin = jnp.min(jnp.where(live, kp, jnp.inf), axis=3)  # [B, K, P, H]
    kmax = jnp.max(jnp.where(live, kp, -jnp.inf), axis=3)
    qg = q.reshape(b, kh, n // kh, 1, h).astype(jnp.float32)
    bound = jnp.maximum(qg * kmin[:, :, None], qg * kmax[:, :, None])  # [B, K, G, P, H]
    bound = jnp.sum(jnp.where(jnp.isfinite(bound), bound, 0.0), axis=(2, 4))  # [B, K, P]
    page_live = pos[None, :, 0] < lengths[:, None]  # [B, P]
    n_pages = min(pages, math.ceil(k_max / page))
    _, top = jax.lax.top_k(jnp.where(page_live[:, None], bound, -jnp.inf), n_pages)  # [B, K, n_pages]
    idx = (top[..., None] * page + jnp.arange(page)).reshape(b, kh, n_pages * page)
    rank = jnp.repeat(jnp.arange(n_pages), page)
    pages_kept = (budget + page - 1) // page  # [B]
    valid = (rank[None, None] < pages_kept[:, None, None]) & (idx < lengths[:, None, None])
    return jnp.where(valid, idx, 0).astype(jnp.int32), valid


def with_always_kept(indices, valid, lengths, cfg: RetrievalConfig):
    """Add the sink tokens and the recent window as extra slots; drop them from the selection so none counts twice."""
    if not cfg.sink_tokens and not cfg.recent_window:
        return indices, valid
    lo = lengths[:, None, None] - cfg.recent_window
    forced = (indices < cfg.sink_tokens) | (indices >= lo)
    valid = valid & ~forced
    extra = jnp.concatenate(
        [jnp.arange(cfg.sink_tokens), jnp.arange(cfg.recent_window)], dtype=jnp.int32
    )  # sink positions, then offsets into the window
    b, kh = indices.shape[:2]
    is_sink = jnp.arange(extra.shape[0]) < cfg.sink_tokens
    pos = jnp.where(is_sink[None], extra[None], lengths[:, None] - cfg.recent_window + extra[None])  # [B, E]
    # A slot is live if it is a real token, and a window slot must not repeat a sink token.
    ok = (pos >= 0) & (pos < lengths[:, None]) & (is_sink[None] | (pos >= cfg.sink_tokens))
    pos = jnp.broadcast_to(jnp.where(ok, pos, 0)[:, None], (b, kh, pos.shape[1]))
    ok = jnp.broadcast_to(ok[:, None], pos.shape)
    return jnp.concatenate([indices, pos], -1), jnp.concatenate([valid, ok], -1)


def select(
    q, k_cache, lengths, scale, *, cfg: RetrievalConfig, code_cache=None, hash_module=None, q_codes=None
) -> tuple[jax.Array, jax.Array]:
    """The rows a sparse layer's decode step reads: (indices int32, valid bool), both [B, K, k_max (+ kept)].

    `q_codes` [B, N, W]: the queries' codes when the caller hashed them already (the fused decode prologue)."""
    k_max = cfg.k_max(k_cache.shape[2])
    budget = live_budget(lengths, cfg, k_max)
    if cfg.method in CODE_METHODS:
        if hash_module is None or code_cache is None:
            raise ValueError(f"retrieval method {cfg.method!r} needs hash modules and a key-code cache")
        # With rerank R the Hamming stage keeps R * k candidates for the exact second stage.
        k_cand = min(k_cache.shape[2], cfg.rerank * k_max)
        sel = hamming_topk(
            hash_module.query_codes(q) if q_codes is None else q_codes,
            code_cache,
            lengths,
            k_cand,
            jnp.minimum(cfg.rerank * budget, k_cand),
            implementation=cfg.implementation,
            one_launch=cfg.topk_one_launch,
        )
        indices, valid = sel.indices, sel.valid
        if cfg.rerank > 1:
            indices, valid = rerank(
                q, k_cache, indices, valid, lengths, scale, k_max, budget, cfg.implementation, top_p=cfg.top_p,
                min_keep=cfg.min_keep,
            )  # fmt: skip
    elif cfg.method == "oracle":
        probs = group_attention_probs(q, k_cache, lengths, scale)  # [B, K, S]
        indices, valid = topk_by_score(probs, lengths, k_max, budget)
        if cfg.top_p < 1.0:
            sorted_probs = jnp.take_along_axis(probs, indices, axis=-1)  # descending: lax.top_k's order
            keep = mass_budget(sorted_probs, q.shape[1] // k_cache.shape[1], cfg.top_p, cfg.min_keep, budget)
            valid = valid & _keep_first(keep, k_max, indices.shape)
    elif cfg.method == "quest":
        indices, valid = quest_select(q, k_cache, lengths, k_max, budget, cfg.quest_page_size)
    else:
        raise ValueError(f"no selection for method {cfg.method!r}")
    return with_always_kept(indices, valid, lengths, cfg)


def decode_attention(
    q: jax.Array,  # [B, N, H]
    k_cache: jax.Array,  # [B, K, S, H] (already holds this step's key at lengths-1)
    v_cache: jax.Array,  # [B, K, S, H]
    lengths: jax.Array,  # [B] live rows including this step's token
    scale: float,
    *,
    layer: int,
    cfg: RetrievalConfig,
    code_cache: jax.Array | None = None,  # [B, K, S, W] uint32
    hash_module=None,
    window: int | None = None,  # sliding-window models (dense only)
    q_codes: jax.Array | None = None,  # [B, N, W] uint32, when hashed already (else hash_module hashes q)
) -> jax.Array:  # [B, N, H] fp32
    """One decode step of one layer: dense on dense layers, else select rows and attend over only those."""
    if not cfg.is_sparse_layer(layer):
        return dense_decode_attention(q, k_cache, v_cache, lengths, scale, window, cfg.implementation)
    if cfg.method in CODE_METHODS and not (cfg.sink_tokens or cfg.recent_window or cfg.rerank > 1):
        # The fused path: Hamming top-k and sparse attention back to back (Pallas on GPU).
        k_max = cfg.k_max(k_cache.shape[2])
        q_codes = hash_module.query_codes(q) if q_codes is None else q_codes
        out = spotlight_attention(
            q, k_cache, v_cache, q_codes, code_cache, lengths, k_max,
            live_budget(lengths, cfg, k_max), scale, implementation=cfg.implementation,
            one_launch=cfg.topk_one_launch,
        )  # fmt: skip
        return out.astype(jnp.float32)
    indices, valid = select(
        q, k_cache, lengths, scale, cfg=cfg, code_cache=code_cache, hash_module=hash_module, q_codes=q_codes
    )
    out = sparse_decode_attention(q, k_cache, v_cache, indices, valid, scale, implementation=cfg.implementation)
    return out.astype(jnp.float32)
