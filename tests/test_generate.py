"""generate(): cache consistency, ragged batching, bucketing, sampling and bad input, on a tiny random model; stop
strings and chat on the embedded SmolLM2 (real_model)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spotlight_jax.config import ModelConfig
from spotlight_jax.generate import (
    SamplingConfig,
    _generate_jit,
    bucket,
    chat,
    generate,
    sample_token,
    truncate_at_stop,
)
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
    sample = jax.jit(sample_token, static_argnames="sampling")  # eagerly, each lax.cond would compile anew
    cfg = SamplingConfig(temperature=1.0, top_k=3)
    a = sample(logits, jax.random.key(1), cfg)
    b = sample(logits, jax.random.key(1), cfg)
    np.testing.assert_array_equal(a, b)
    top3 = np.asarray(jax.lax.top_k(logits, 3)[1])
    for _ in range(5):
        toks = np.asarray(sample(logits, jax.random.key(_), cfg))
        assert all(t in top3[i] for i, t in enumerate(toks))
    # top_p tiny -> always the argmax; top_k 1 too
    greedy = sample(logits, jax.random.key(2), SamplingConfig(temperature=1.0, top_p=1e-6))
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
    top1 = sample(logits, jax.random.key(2), SamplingConfig(do_sample=True, temperature=3.0, top_k=1))
    np.testing.assert_array_equal(top1, jnp.argmax(logits, -1))
    # do_sample=False is greedy whatever the temperature; the traced form samples the same as the static one
    off = SamplingConfig(temperature=5.0, do_sample=False)
    np.testing.assert_array_equal(sample(logits, jax.random.key(3), off), jnp.argmax(logits, -1))
    np.testing.assert_array_equal(jax.jit(sample_token)(logits, jax.random.key(1), cfg.params()), a)
    # top_p keeps the smallest most likely set whose mass reaches top_p
    probs = np.asarray(jax.nn.softmax(logits, -1))
    order = np.argsort(-probs, axis=-1)
    nucleus = [set(o[: int(np.searchsorted(np.cumsum(p[o]), 0.5) + 1)]) for o, p in zip(order, probs, strict=True)]
    for s in range(5):
        toks = np.asarray(sample(logits, jax.random.key(s), SamplingConfig(temperature=1.0, top_p=0.5)))
        assert all(t in nucleus[i] for i, t in enumerate(toks))


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


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(prompts=[[5, 96]]), "outside the vocabulary"),
        (dict(prompts=[[-1, 5]]), "outside the vocabulary"),
        (dict(prompts=[1.5, 2.0]), "integer token ids"),
        (dict(prompts=[[True, False]]), "integer token ids"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(do_sample="yes"), "do_sample"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(seed=1, key=jax.random.key(1)), "not both"),
        (dict(seed=1.5), "seed"),
        (dict(eos_token_id=3, eos_token_ids=[3]), "not both"),
        (dict(eos_token_id="x"), "eos_token_id"),
        (dict(stop_strings="x"), "tokenizer"),
        (dict(prompts=None, messages=[{"role": "user", "content": "hi"}]), "tokenizer"),
        (dict(prompts=None), "needs prompts"),
    ],
)
def test_bad_values_are_one_line_errors(model, kw, match):
    kw = {"prompts": [[5, 6, 7]], **kw}
    with pytest.raises(ValueError, match=match) as e:
        generate(model, kw.pop("prompts"), **kw)
    assert "\n" not in str(e.value)


def test_unknown_keyword_is_a_type_error(model):
    with pytest.raises(TypeError):
        generate(model, [5, 6], temprature=0.7)


class CharTokenizer:
    """A stand-in tokenizer: token t <-> the character chr(0x100 + t); a trivial chat template when `chat=True`."""

    eos_token_id = None

    def __init__(self, chat=False):
        self.chat_template = "{{ messages }}" if chat else None

    def encode(self, text, add_special_tokens=True):
        return [ord(c) - 0x100 for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(0x100 + int(t)) for t in ids)

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        text = "".join(self.decode([4 + len(m["role"])]) + m["content"] for m in messages) + self.decode([5])
        return self.encode(text) if tokenize else text


def test_hf_keywords(model):
    p = _prompts([7], seed=21)
    kw = dict(max_new_tokens=12, eos_token_ids=[])
    greedy = generate(model, p, **kw).tokens
    for extra in (dict(do_sample=False, temperature=5.0), dict(do_sample=False, top_k=3, top_p=0.5),
                  dict(do_sample=True, temperature=1.7, top_k=1), dict(sampling=SamplingConfig(temperature=1.0),
                  do_sample=False), dict(temperature=0.0), dict(do_sample=True, temperature=0.0)):  # fmt: skip
        np.testing.assert_array_equal(generate(model, p, **kw, **extra).tokens, greedy, err_msg=str(extra))
    a = generate(model, p, **kw, do_sample=True, seed=3).tokens
    np.testing.assert_array_equal(generate(model, p, **kw, do_sample=True, seed=3).tokens, a)
    np.testing.assert_array_equal(generate(model, p, **kw, do_sample=True, key=jax.random.key(3)).tokens, a)
    assert not np.array_equal(generate(model, p, **kw, do_sample=True, seed=4).tokens, a)
    assert not np.array_equal(a, greedy)
    # A temperature alone turns sampling on (as SamplingConfig(temperature=...) does); keywords override `sampling`.
    hot = generate(model, p, **kw, temperature=1.0, seed=3).tokens
    np.testing.assert_array_equal(hot, a)
    cfg = SamplingConfig(temperature=0.2, top_k=5)
    np.testing.assert_array_equal(generate(model, p, **kw, sampling=cfg, temperature=1.0, top_k=0, seed=3).tokens, a)
    # eos_token_id: one id or several; eos_token_ids is its alias
    eos = int(greedy[0, 5])
    one = generate(model, p, max_new_tokens=12, eos_token_id=eos)
    assert one.lengths[0] == int(np.argmax(greedy[0] == eos)) + 1
    other = next(t for t in range(4, CFG.vocab_size) if t not in greedy[0])
    np.testing.assert_array_equal(generate(model, p, max_new_tokens=12, eos_token_id=[eos, other]).tokens, one.tokens)
    np.testing.assert_array_equal(generate(model, p, max_new_tokens=12, eos_token_ids=[eos]).tokens, one.tokens)


def test_sampling_values_do_not_recompile(model):
    p = _prompts([9], seed=22)
    generate(model, p, max_new_tokens=12)
    before = _generate_jit._cache_size()
    for extra in (dict(do_sample=True), dict(do_sample=False), dict(temperature=0.3, seed=5), dict(temperature=2.0),
                  dict(do_sample=True, top_k=4, top_p=0.8, seed=9), dict(eos_token_id=[3, 4, 5]),
                  dict(max_new_tokens=15, top_p=0.2, temperature=0.9)):  # fmt: skip
        generate(model, p, **{"max_new_tokens": 12, **extra})
    assert _generate_jit._cache_size() == before


def test_echo_and_logprobs_match_a_forward_pass(model):
    prompts = _prompts([5, 11], seed=23)
    n = 10
    plain = generate(model, prompts, max_new_tokens=n, eos_token_ids=[])
    for extra in (dict(), dict(do_sample=True, seed=1)):
        out = generate(model, prompts, max_new_tokens=n, eos_token_ids=[], echo=True, return_logprobs=True, **extra)
        assert out.tokens.shape == (2, 11 + n) and out.logprobs.shape == (2, n)
        np.testing.assert_array_equal(out.prompt_lengths, [5, 11])
        np.testing.assert_array_equal(out.lengths, [n, n])
        seqs = np.zeros((2, 11 + n), np.int32)  # right-padded: a causal model's earlier positions do not see the pad
        for i, p in enumerate(prompts):
            np.testing.assert_array_equal(out.tokens[i, : len(p)], p)
            if not extra:
                np.testing.assert_array_equal(out.tokens[i, len(p) : len(p) + n], plain.tokens[i])
            seqs[i, : len(p) + n] = out.tokens[i, : len(p) + n]
        logp = np.asarray(jax.nn.log_softmax(jax.jit(lambda t: model(t).logits)(jnp.asarray(seqs)), axis=-1))
        for i, p in enumerate(prompts):
            pos = np.arange(len(p) - 1, len(p) - 1 + n)
            want = logp[i, pos, seqs[i, pos + 1]]
            np.testing.assert_allclose(out.logprobs[i], want, atol=1e-4)
    assert plain.logprobs is None


def test_stop_strings_with_a_tokenizer(model):
    tok = CharTokenizer()
    p = _prompts([6], seed=24)
    free = generate(model, p, max_new_tokens=14, eos_token_ids=[], tokenizer=tok)
    g = free.tokens[0].tolist()
    stop = tok.decode(g[6:8])  # a two-token stop string; the row ends where its tokens first appear
    first = next(j for j in range(1, 14) if g[j - 1 : j + 1] == g[6:8])
    out = generate(model, p, max_new_tokens=14, eos_token_ids=[], tokenizer=tok, stop_strings=[stop, "\u0300"])
    assert out.lengths[0] == first + 1
    np.testing.assert_array_equal(out.tokens[0, : first + 1], g[: first + 1])
    assert out.text[0] == tok.decode(g[: first - 1])  # text cut before the stop string
    # echo puts the prompt text first
    echoed = generate(model, p, max_new_tokens=14, eos_token_ids=[], tokenizer=tok, stop_strings=stop, echo=True)
    assert echoed.text[0] == tok.decode(p[0]) + out.text[0]


def test_truncate_at_stop():
    assert truncate_at_stop("Hello. World\n\nBye", ["\n\n", "."]) == ("Hello", True)
    assert truncate_at_stop("abcdef", ["cdef", "de"]) == ("abc", True)  # cut before the stop string that ends first
    assert truncate_at_stop("abc", ["x"]) == ("abc", False)


def test_messages_apply_the_chat_template(model):
    tok = CharTokenizer(chat=True)
    conv = [{"role": "user", "content": tok.decode([10, 11, 12])}]
    want = tok.apply_chat_template(conv, add_generation_prompt=True)
    out = generate(model, messages=conv, tokenizer=tok, max_new_tokens=12, eos_token_ids=[])
    ref = generate(model, [want], tokenizer=tok, max_new_tokens=12, eos_token_ids=[])
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    assert chat(model, tok, conv, max_new_tokens=12, eos_token_ids=[]) == ref.text[0]
    conv2 = [{"role": "system", "content": tok.decode([7])}, *conv]
    both = chat(model, tok, [conv, conv2], max_new_tokens=12, eos_token_ids=[])
    assert isinstance(both, list) and both[0] == ref.text[0]
    with pytest.raises(ValueError, match="no chat template"):
        generate(model, messages=conv, tokenizer=CharTokenizer())
    with pytest.raises(ValueError, match="not both"):
        generate(model, [[5, 6]], messages=conv, tokenizer=tok)
    with pytest.raises(ValueError, match="messages must be"):
        generate(model, messages="hello", tokenizer=tok)


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


# ---------------------------------------------------------------------------------------------------------------------
# The embedded SmolLM2-135M-Instruct and its tokenizer (one compiled program: one chat prompt bucket, 16 new tokens).

QUESTION = [{"role": "user", "content": "Name three colours."}]


@pytest.mark.real_model
def test_real_chat_and_stop_strings(smollm2_jax):
    model, tok, _ = smollm2_jax
    kw = dict(max_new_tokens=16, eos_token_ids=[])
    free = generate(model, messages=QUESTION, tokenizer=tok, echo=True, **kw)
    template = tok.encode(tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False))
    n_prompt = int(free.prompt_lengths[0])
    np.testing.assert_array_equal(free.tokens[0, :n_prompt], template)
    assert free.text[0].endswith(chat(model, tok, QUESTION, **kw))
    g = free.tokens[0, n_prompt:].tolist()
    # A stop string of two tokens that round-trips through the tokenizer ends the row where its tokens first appear.
    j = next(j for j in range(3, 15) if tok.encode(tok.decode(g[j : j + 2]), add_special_tokens=False) == g[j : j + 2])
    stop = tok.decode(g[j : j + 2])
    first = next(k for k in range(1, 16) if g[k - 1 : k + 1] == g[j : j + 2])
    out = generate(model, messages=QUESTION, tokenizer=tok, stop_strings=[stop], **kw)
    assert out.lengths[0] == first + 1
    free_text = tok.decode(g, skip_special_tokens=True)
    assert out.text[0] == truncate_at_stop(free_text, [stop])[0]
    assert stop not in out.text[0]
    # The text is cut at a stop string even where the model spelled it with other tokens (no early stop then).
    piece = free_text[len(free_text) // 2 :][:3]
    cut = generate(model, messages=QUESTION, tokenizer=tok, stop_strings=piece, **kw)
    assert cut.text[0] == free_text[: free_text.find(piece)]
