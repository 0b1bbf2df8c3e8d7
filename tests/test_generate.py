"""generate(): cache consistency, ragged batching, bucketing, sampling and bad input, on a tiny random model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spotlight_jax.config import ModelConfig
from spotlight_jax.generate import SamplingConfig, _generate_jit, bucket, generate, sample_token
from spotlight_jax.model import CausalLM, init_cache

CFG = ModelConfig(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=16,
    max_position_embeddings=512, eos_token_ids=(3,),
)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return CausalLM(CFG, rngs=nnx.Rngs(7))


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, CFG.vocab_size, n).tolist() for n in lengths]


@pytest.mark.parametrize("window", [None, 5])
def test_decode_logits_equal_prefill_logits(model, window):
    if window is not None:  # the same weights as a sliding-window (Mistral-style) model
        model = nnx.merge(nnx.graphdef(CausalLM(dataclasses.replace(CFG, sliding_window=window))), nnx.state(model))
    tokens = jnp.asarray(_prompts([20, 20], seed=1))
    full = model(tokens).logits  # [B, 20, V]
    cache = init_cache(model.cfg, 2, 64)
    out = model(tokens[:, :12], cache=cache, lengths=jnp.full((2,), 12))
    np.testing.assert_allclose(out.logits, full[:, :12], atol=1e-5, rtol=1e-5)
    cache = out.cache
    for t in range(12, 20):
        step = model(tokens[:, t : t + 1], positions=jnp.full((2, 1), t), cache=cache, lengths=jnp.full((2,), t + 1))
        np.testing.assert_allclose(step.logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
        cache = step.cache


def test_ragged_batch_equals_single_prompts(model):
    prompts = _prompts([3, 17, 9, 1], seed=2)
    batched = generate(model, prompts, max_new_tokens=24)
    for i, p in enumerate(prompts):
        single = generate(model, p, max_new_tokens=24)
        np.testing.assert_array_equal(batched.tokens[i], single.tokens[0])
        assert batched.lengths[i] == single.lengths[0]


def test_greedy_matches_step_by_step_argmax(model):
    prompt = _prompts([5], seed=3)[0]
    out = generate(model, prompt, max_new_tokens=10, eos_token_ids=[])
    seq = list(prompt)
    for _ in range(10):
        seq.append(int(jnp.argmax(model(jnp.asarray([seq])).logits[0, -1])))
    np.testing.assert_array_equal(out.tokens[0], seq[len(prompt) :])


def test_eos_stops_row_and_pads(model):
    prompt = _prompts([6], seed=4)[0]
    free = generate(model, prompt, max_new_tokens=12, eos_token_ids=[])
    eos = int(free.tokens[0, 4])  # pretend the 5th generated token is EOS
    out = generate(model, prompt, max_new_tokens=12, eos_token_ids=[eos], pad_id=-1)
    first = int(np.argmax(free.tokens[0] == eos))
    assert out.lengths[0] == first + 1
    np.testing.assert_array_equal(out.tokens[0, : first + 1], free.tokens[0, : first + 1])
    assert (out.tokens[0, first + 1 :] == -1).all()


def test_no_recompile_within_bucket(model):
    generate(model, _prompts([5, 9]), max_new_tokens=9)
    before = _generate_jit._cache_size()
    generate(model, _prompts([12, 2], seed=5), max_new_tokens=14)  # same prompt bucket (16) and out bucket (16)
    generate(model, _prompts([16, 7], seed=6), max_new_tokens=16)
    assert _generate_jit._cache_size() == before


def test_sampling_is_reproducible_and_respects_top_k():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    cfg = SamplingConfig(temperature=1.0, top_k=3)
    a = sample_token(logits, jax.random.key(1), cfg)
    b = sample_token(logits, jax.random.key(1), cfg)
    np.testing.assert_array_equal(a, b)
    top3 = np.asarray(jax.lax.top_k(logits, 3)[1])
    for _ in range(5):
        toks = np.asarray(sample_token(logits, jax.random.key(_), cfg))
        assert all(t in top3[i] for i, t in enumerate(toks))
    # top_p tiny -> always the argmax
    greedy = sample_token(logits, jax.random.key(2), SamplingConfig(temperature=1.0, top_p=1e-6))
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))


def test_sampled_generation_depends_on_key(model):
    sampling = SamplingConfig(temperature=1.0)
    p = _prompts([4], seed=8)
    a = generate(model, p, max_new_tokens=16, sampling=sampling, key=jax.random.key(0), eos_token_ids=[])
    b = generate(model, p, max_new_tokens=16, sampling=sampling, key=jax.random.key(0), eos_token_ids=[])
    c = generate(model, p, max_new_tokens=16, sampling=sampling, key=jax.random.key(1), eos_token_ids=[])
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_bad_input_errors(model):
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[5, 6], []])
    with pytest.raises(ValueError, match="does not fit a cache"):
        generate(model, _prompts([40]), max_new_tokens=30, max_len=64)
    with pytest.raises(ValueError, match="context"):
        generate(model, _prompts([500]), max_new_tokens=30)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, "hello")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, _prompts([4]), max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)


def test_bucket():
    assert [bucket(n) for n in (1, 16, 17, 100, 1024)] == [16, 16, 32, 128, 1024]


def test_streamer_receives_every_token_without_recompiling(model):
    prompts = _prompts([6, 11], seed=11)
    plain = generate(model, prompts, max_new_tokens=12, eos_token_ids=[])
    seen, started = [], []

    class Streamer:
        def on_start(self):
            started.append(True)

        def __call__(self, i, tokens):
            seen.append((i, tokens.copy()))

    out = generate(model, prompts, max_new_tokens=12, eos_token_ids=[], streamer=Streamer())
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    assert started == [True]
    assert [i for i, _ in seen] == list(range(12))
    np.testing.assert_array_equal(np.stack([t for _, t in seen], axis=1), plain.tokens)
    before = _generate_jit._cache_size()
    generate(model, prompts, max_new_tokens=12, eos_token_ids=[], streamer=lambda i, t: None)  # another streamer
    assert _generate_jit._cache_size() == before
