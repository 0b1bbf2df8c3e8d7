"""The decode-path evaluations compute what generate() computes (tiny random model, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spotlight_jax.config import ModelConfig, RetrievalConfig
from spotlight_jax.eval import decoding, perplexity
from spotlight_jax.generate import generate
from spotlight_jax.hashing import HashConfig, HashStack
from spotlight_jax.model import CausalLM, init_cache

CFG = ModelConfig(
    vocab_size=64, hidden_size=48, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32,
    max_position_embeddings=512,
)  # fmt: skip
MODEL = CausalLM(CFG, rngs=nnx.Rngs(11))
HASHES = HashStack(CFG, HashConfig(kind="spotlight", bits=64), dense_layers=(0,), rngs=nnx.Rngs(2))
SPOT = RetrievalConfig(method="spotlight", bits=64, keep_ratio=0.1, min_keep=3, dense_layers=(0,))


def _tokens(b, n, seed=0):
    return np.random.default_rng(seed).integers(1, CFG.vocab_size, (b, n)).astype(np.int32)


def test_teacher_forced_dense_nll_equals_full_forward():
    tokens = _tokens(2, 40)
    shared, _, _ = decoding.prefill_batch(MODEL, tokens[:, :16], 40)
    parts = decoding.split_model(MODEL, None)
    nll = decoding.teacher_forced_nll(*parts, jnp.asarray(tokens), shared, retrieval_cfg=RetrievalConfig(), prefix=16)
    logp = np.asarray(jax.nn.log_softmax(MODEL(jnp.asarray(tokens)).logits, axis=-1))
    ref = -np.take_along_axis(logp[:, 16:39], tokens[:, 17:40, None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(nll), ref, atol=1e-4)


def test_codes_from_dense_prefill_equal_generate_prefill_codes():
    tokens = _tokens(2, 24, seed=1)
    shared, _, _ = decoding.prefill_batch(MODEL, tokens, 32)
    hg, hs = nnx.split(HASHES)
    derived = decoding.with_codes(hg, hs, shared, retrieval_cfg=SPOT)
    direct = MODEL(
        jnp.asarray(tokens), cache=init_cache(CFG, 2, 32, retrieval_cfg=SPOT), lengths=jnp.full((2,), 24),
        retrieval_cfg=SPOT, hashes=HASHES,
    ).cache  # fmt: skip
    for i in (1, 2):
        np.testing.assert_array_equal(np.asarray(derived.codes[i])[:, :, :24], np.asarray(direct.codes[i])[:, :, :24])
    assert derived.codes[0] is None


def test_shared_prefill_greedy_decode_equals_generate():
    prompts = _tokens(3, 30, seed=2)
    shared, logits, lengths = decoding.prefill_batch(MODEL, prompts, 64)
    parts = decoding.split_model(MODEL, HASHES)
    cache = decoding.with_codes(parts[2], parts[3], decoding.copy_cache(shared), retrieval_cfg=SPOT)
    toks = decoding.greedy_decode(*parts, cache, logits, lengths, retrieval_cfg=SPOT, out_len=16)
    ref = generate(
        MODEL, prompts.tolist(), max_new_tokens=16, retrieval_cfg=SPOT, hashes=HASHES, eos_token_ids=[], max_len=64
    )
    np.testing.assert_array_equal(np.asarray(toks), ref.tokens)
    # the shared prefill survives (it was copied, not donated)
    assert np.isfinite(np.asarray(shared.k[0])).all()


def test_prefill_into_a_cache_narrower_than_the_length_bucket():
    """A 7168-token passkey prompt + 8 answer tokens: bucket 8192 > cache 7176 (failed on the GPU run)."""
    tokens = _tokens(2, 40, seed=3)  # bucket(40) = 64 > cache 44
    cache, logits, lengths = decoding.prefill_batch(MODEL, tokens, 44)
    assert cache.k[0].shape[2] == 44 and list(np.asarray(lengths)) == [40, 40]
    ref = MODEL(jnp.asarray(tokens)).logits[:, -1]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-4)


def test_token_files_carry_their_corpus(tmp_path):
    path = str(tmp_path / "t.npz")
    cfg = decoding.DecodeEvalConfig(save_tokens=path, data="/somewhere/pydocs.jsonl.gz")
    _, label = decoding.tokens_or_build(cfg, lambda: {"prompts": _tokens(2, 8)})
    assert label == "/somewhere/pydocs.jsonl.gz"
    arrays, label = decoding.tokens_or_build(decoding.DecodeEvalConfig(tokens=path), lambda: 1 / 0)
    assert list(arrays) == ["prompts"] and label == "pydocs.jsonl.gz"


def test_method_modifiers_set_always_kept_rows():
    cfg, ecfg = CFG, decoding.DecodeEvalConfig()
    label, rcfg, stack = decoding.method_setup("oracle+sink4+recent16", cfg, ecfg)
    assert (label, rcfg.method, rcfg.sink_tokens, rcfg.recent_window, stack) == (
        "oracle+sink4+recent16",
        "oracle",
        4,
        16,
        None,
    )
    label, rcfg, _ = decoding.method_setup("linear-256+sink2", cfg, ecfg)
    assert (label, rcfg.bits, rcfg.sink_tokens, rcfg.recent_window) == ("linear-256+sink2", 256, 2, 0)
    with pytest.raises(ValueError, match="unknown method modifier"):
        decoding.method_setup("oracle+sinks", cfg, ecfg)
    with pytest.raises(ValueError, match="apply to sparse methods"):
        decoding.method_setup("dense+sink4", cfg, ecfg)
    with pytest.raises(ValueError, match="needs hashes"):
        decoding.method_setup("spotlight", cfg, ecfg)


def test_config_is_checked_before_the_model_loads(tmp_path):
    decoding.DecodeEvalConfig(methods=("dense", "oracle+keep5", "linear-64")).check()
    for methods, match in ((("dense", "spotlight"), "needs hashes"), (("nope",), "unknown method")):
        with pytest.raises(ValueError, match=match):
            decoding.DecodeEvalConfig(methods=methods).check()
    with pytest.raises(FileNotFoundError, match="hash checkpoint folder not found"):
        decoding.DecodeEvalConfig(hashes=str(tmp_path / "none")).check()


def test_keep_modifier_overrides_the_keep_ratio(tmp_path):
    ecfg = decoding.DecodeEvalConfig()
    label, rcfg, _ = decoding.method_setup("oracle+keep5+sink4", CFG, ecfg)
    assert (label, rcfg.keep_ratio, rcfg.sink_tokens) == ("oracle+keep5+sink4", 0.05, 4)
    assert decoding.method_setup("oracle", CFG, ecfg)[1].keep_ratio == 0.02
    assert decoding.method_setup("linear-256+keep2.5", CFG, ecfg)[1].keep_ratio == 0.025
    for bad in ("oracle+keep0", "oracle+keep150", "oracle+keepall"):
        with pytest.raises(ValueError, match="percentage"):
            decoding.method_setup(bad, CFG, ecfg)
    assert perplexity.method_family("spotlight-128+keep5+sink4") == "spotlight-128+sink4"
    rows = [
        {"method": "dense", "keep_ratio": None, "ppl": 7.6},
        {"method": "oracle", "keep_ratio": 0.02, "ppl": 8.0},
        {"method": "oracle+keep10", "keep_ratio": 0.1, "ppl": 7.65},
    ]
    perplexity.plot_vs_keep(rows, 7.6, str(tmp_path / "k.png"))
    assert (tmp_path / "k.png").stat().st_size > 0
