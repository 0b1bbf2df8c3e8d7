"""Chunked prefill (`spotlight_jax.prefill`): equal to the one-shot prefill for every family, ragged batches, chunks
that do not divide the prompt, one-chunk and one-token prompts, key codes filled chunk by chunk, and bad chunks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spotlight_jax.config import ModelConfig, PrefillConfig, RetrievalConfig, default_chunk
from spotlight_jax.generate import generate
from spotlight_jax.hashing import HashConfig, HashStack
from spotlight_jax.model import CausalLM, init_cache
from spotlight_jax.prefill import prefill

# Logits of a chunked prefill differ from the one-shot forward only by fp32 summation order.
ATOL = 2e-5

_BASE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
    max_position_embeddings=256,
)  # fmt: skip
FAMILIES = {
    "llama": ModelConfig(**_BASE),
    "llama3.1": ModelConfig(
        **_BASE,
        rope_theta=500000.0,
        rope_scaling=tuple(
            sorted(
                dict(
                    rope_type="llama3",
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=16,
                ).items()
            )
        ),
    ),  # fmt: skip
    "qwen2": ModelConfig(**_BASE, model_type="qwen2", attention_bias=True, tie_word_embeddings=True),
    "mistral-window": ModelConfig(**_BASE, model_type="mistral", sliding_window=7),
}


def _model(cfg: ModelConfig, seed: int = 0) -> CausalLM:
    model = CausalLM(cfg, rngs=nnx.Rngs(seed))
    # Random norms and biases, so that a dropped bias or norm in one path would show.
    state = nnx.state(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


def _rows(lengths, seed=0, vocab=96):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).astype(np.int32) for n in lengths]


def _padded(rows, width):
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return jnp.asarray(out), jnp.asarray([len(r) for r in rows], jnp.int32)


def _last_logits_one_shot(model, tokens, lengths):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, t, n: nnx.merge(graphdef, st)(t, lengths=n, logits="last").logits[:, 0])
    return fn(state, tokens, lengths)


def _chunked(model, tokens, lengths, cache_len, chunk, retrieval_cfg=RetrievalConfig(), hashes=None):
    graphdef, state = nnx.split(model)
    hash_graphdef, hash_state = nnx.split(hashes) if hashes is not None else (None, None)
    cache = init_cache(model.cfg, tokens.shape[0], cache_len, retrieval_cfg=retrieval_cfg)

    @jax.jit
    def fn(state, hash_state, tokens, lengths, cache):
        h = nnx.merge(hash_graphdef, hash_state) if hash_graphdef is not None else None
        m = nnx.merge(graphdef, state)
        return prefill(m, tokens, lengths, cache, chunk=chunk, retrieval_cfg=retrieval_cfg, hashes=h)

    return fn(state, hash_state, tokens, lengths, cache)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_chunked_logits_and_cache_equal_one_shot(family, chunk):
    model = _model(FAMILIES[family])
    rows = _rows([37, 20, 1, 33], seed=1)
    tokens, lengths = _padded(rows, 40)
    logits, cache = _chunked(model, tokens, lengths, 64, chunk)
    want = _last_logits_one_shot(model, tokens, lengths)
    np.testing.assert_allclose(logits, want, atol=ATOL, rtol=ATOL)
    # The cache holds what the one-shot prefill writes, on every row's live positions.
    _, ref_cache = _chunked(model, tokens, lengths, 64, 64)
    for layer in range(model.cfg.num_layers):
        for b, n in enumerate(np.asarray(lengths)):
            for got, ref in ((cache.k, ref_cache.k), (cache.v, ref_cache.v)):
                np.testing.assert_allclose(got[layer][b, :, :n], ref[layer][b, :, :n], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("lengths", [[16], [1], [1, 9], [17, 3]])
def test_one_chunk_one_token_and_ragged(lengths):
    model = _model(FAMILIES["llama"], seed=2)
    rows = _rows(lengths, seed=3)
    tokens, lens = _padded(rows, 32)
    want = _last_logits_one_shot(model, tokens, lens)
    for chunk in (1, 16, 32):
        logits, _ = _chunked(model, tokens, lens, 32, chunk)
        np.testing.assert_allclose(logits, want, atol=ATOL, rtol=ATOL, err_msg=f"chunk {chunk}")


def test_decode_after_chunked_prefill_equals_full_forward():
    model = _model(FAMILIES["qwen2"], seed=4)
    row = _rows([30], seed=5)[0]
    full = model(jnp.asarray(row)[None]).logits[0]  # [30, V]
    tokens, lengths = _padded([row[:21]], 32)
    _, cache = _chunked(model, tokens, lengths, 48, 8)
    for t in range(21, 30):
        step = model(jnp.asarray(row[t : t + 1])[None], positions=jnp.full((1, 1), t), cache=cache,
                     lengths=jnp.full((1,), t + 1))  # fmt: skip
        np.testing.assert_allclose(step.logits[0, 0], full[t], atol=ATOL, rtol=ATOL)
        cache = step.cache


def test_key_codes_filled_chunk_by_chunk():
    cfg = FAMILIES["llama"]
    model = _model(cfg, seed=6)
    hashes = HashStack(cfg, HashConfig(kind="spotlight", bits=64), layers=(1,), rngs=nnx.Rngs(1))
    rcfg = RetrievalConfig(method="spotlight", bits=64, dense_layers=(0,))
    tokens, lengths = _padded(_rows([29, 12], seed=7), 32)
    _, cache = _chunked(model, tokens, lengths, 32, 7, retrieval_cfg=rcfg, hashes=hashes)
    assert cache.codes[0] is None
    want = hashes.for_layer(1).key_codes(cache.k[1])  # codes of the prefilled keys, computed in one go
    for b, n in enumerate(np.asarray(lengths)):
        np.testing.assert_array_equal(cache.codes[1][b, :, :n], want[b, :, :n])


def test_generate_tokens_do_not_depend_on_the_chunk():
    model = _model(FAMILIES["mistral-window"], seed=8)
    prompts = [r.tolist() for r in _rows([23, 5, 40], seed=9)]
    want = generate(model, prompts, max_new_tokens=6, eos_token_ids=[])
    for chunk in (3, 16):
        got = generate(model, prompts, max_new_tokens=6, eos_token_ids=[], prefill_chunk=chunk)
        np.testing.assert_array_equal(got.tokens, want.tokens)


@pytest.mark.parametrize("chunk", [0, -4, 2.5, True])
def test_bad_chunk_is_a_clear_error(chunk):
    with pytest.raises(ValueError, match="prefill chunk"):
        PrefillConfig(chunk=chunk)


def test_chunk_longer_than_cache_is_a_clear_error():
    model = _model(FAMILIES["llama"])
    with pytest.raises(ValueError, match="longer than the cache"):
        generate(model, [1, 2, 3], max_new_tokens=4, prefill_chunk=1024, max_len=64)


def test_default_chunk_scales_with_batch():
    assert default_chunk(1, "gpu") == 8192 and default_chunk(4, "gpu") == 2048 and default_chunk(3, "gpu") == 2048
    assert default_chunk(1000, "gpu") == 128 and default_chunk(1, "cpu") == 1024
    assert PrefillConfig().chunk_for(2, 32, 64, "cpu") == 32  # never longer than the prompt bucket


@pytest.mark.real_model
def test_smollm2_chunked_prefill_equals_one_shot(smollm2_jax):
    model, tokenizer, _ = smollm2_jax
    text = "def fibonacci(n):\n    " * 40
    row = np.asarray(tokenizer.encode(text)[:300], np.int32)
    tokens, lengths = _padded([row, row[:77]], 320)
    want = _last_logits_one_shot(model, tokens, lengths)
    logits, _ = _chunked(model, tokens, lengths, 384, 96)
    np.testing.assert_allclose(logits, want, atol=2e-4, rtol=2e-4)


def test_dataclass_replace_keeps_validation():
    with pytest.raises(ValueError):
        dataclasses.replace(PrefillConfig(), chunk=0)
