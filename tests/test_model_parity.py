"""Logits of our NNX CausalLM vs transformers' PyTorch implementation (fp32), through every loader path."""

from __future__ import annotations

import dataclasses
import os
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spotlight_jax.convert import load_model
from spotlight_jax.model import CausalLM

TINY_ATOL = 1e-4
REAL_ATOL = 1e-3


def _torch_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _jax_logits(model: CausalLM, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(tokens)).logits)


@pytest.fixture(scope="module")
def reference_logits(tiny_hf_models, tiny_tokens):
    cache = {}

    def get(family: str) -> np.ndarray:
        if family not in cache:
            cache[family] = _torch_logits(tiny_hf_models(family), tiny_tokens)
        return cache[family]

    return get


@pytest.mark.parametrize("loader", ["torch_object", "safetensors_dir", "sharded_safetensors_dir"])
def test_tiny_logits_match_transformers(tiny_family, loader, tiny_hf_models, tiny_tokens, reference_logits, tmp_path):
    hf_model = tiny_hf_models(tiny_family)
    if loader == "torch_object":
        source = hf_model
    else:
        # ~40 KB shards: several files plus model.safetensors.index.json.
        shard = "40KB" if loader == "sharded_safetensors_dir" else "1GB"
        hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size=shard)
        has_index = os.path.exists(tmp_path / "model.safetensors.index.json")
        assert has_index == (loader == "sharded_safetensors_dir")
        source = tmp_path
    model, tokenizer = load_model(source, tokenizer=False)
    assert tokenizer is None
    assert model.cfg.tie_word_embeddings == hf_model.config.tie_word_embeddings
    assert (model.lm_head is None) == model.cfg.tie_word_embeddings
    ours = _jax_logits(model, tiny_tokens)
    ref = reference_logits(tiny_family)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err <= TINY_ATOL, f"{tiny_family} via {loader}: max abs logit error {err:.3g} > {TINY_ATOL}"


def test_tiny_configs_exercise_what_they_claim(tiny_hf_models, tiny_tokens, reference_logits):
    """Guard the guards: llama3 rope scaling and qwen2 biases must change the logits at what we test."""
    model, _ = load_model(tiny_hf_models("llama3.1"), tokenizer=False)
    assert model.cfg.rope_scaling_dict["original_max_position_embeddings"] < tiny_tokens.shape[1]
    plain = CausalLM(dataclasses.replace(model.cfg, rope_scaling=None))
    nnx.update(plain, nnx.state(model))  # same weights, plain RoPE
    diff = np.abs(_jax_logits(plain, tiny_tokens) - reference_logits("llama3.1")).max()
    assert diff > 100 * TINY_ATOL, f"llama3 rope scaling changes logits by only {diff:.3g}"

    local, _ = load_model(tiny_hf_models("mistral-window"), tokenizer=False)
    assert local.cfg.sliding_window is not None and local.cfg.sliding_window < tiny_tokens.shape[1]
    full = CausalLM(dataclasses.replace(local.cfg, sliding_window=None))
    nnx.update(full, nnx.state(local))  # same weights, no window
    diff = np.abs(_jax_logits(full, tiny_tokens) - reference_logits("mistral-window")).max()
    assert diff > 100 * TINY_ATOL, f"the sliding window changes logits by only {diff:.3g}"

    qwen, _ = load_model(tiny_hf_models("qwen2-bias-untied"), tokenizer=False)
    assert qwen.cfg.attention_bias and qwen.layers[0].attn.q_proj.bias is not None
    assert float(jnp.abs(qwen.layers[0].attn.q_proj.bias[...]).max()) > 0.0


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_gguf(smollm2_jax, smollm2_hf):
    """The embedded SmolLM2 (Q4_1 GGUF) on ~300 tokens of real text vs transformers loading the same GGUF."""

    model, tokenizer, _ = smollm2_jax
    assert tokenizer is not None
    text_path = os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")
    with open(text_path, encoding="utf-8") as f:
        text = f.read()[:1200]
    tokens = np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)[None, :]
    assert 200 <= tokens.shape[1] <= 600, tokens.shape

    hf_model = smollm2_hf
    # Config parsed from the GGUF metadata must equal the one transformers derives from it.
    ref_cfg = type(model.cfg).from_hf(hf_model.config, name=model.cfg.name)
    assert model.cfg == ref_cfg
    assert (model.cfg.num_layers, model.cfg.num_heads, model.cfg.num_kv_heads, model.cfg.head_dim) == (30, 9, 3, 64)

    ref = _torch_logits(hf_model, tokens)
    ours = _jax_logits(model, tokens)
    err = np.abs(ours - ref).max()
    print(f"\nSmolLM2 GGUF vs transformers: max abs logit error {err:.2e} over {tokens.shape[1]} tokens")
    assert err <= REAL_ATOL, f"SmolLM2 GGUF: max abs logit error {err:.3g} > {REAL_ATOL}"
    # And the model is a language model, not noise: it predicts this Python source well.
    log_probs = np.asarray(jax.nn.log_softmax(ours[0, :-1], axis=-1))
    nll = -np.take_along_axis(log_probs, tokens[0, 1:, None], axis=-1).mean()
    assert nll < 3.0, f"mean next-token NLL {nll:.2f} on textwrap.py is too high for a trained model"
