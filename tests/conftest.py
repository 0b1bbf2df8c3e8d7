"""Shared fixtures: tiny random HF models of each supported family, and the embedded SmolLM2 GGUF.

Tiny models get *all* parameters randomised (HF initialises norms to 1 and biases to 0, which would hide a mis-mapped
norm or bias), so a wrong key, a missing transpose or a dropped bias shows up in the logits.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `pytest` without an editable install still imports the package under test
    sys.path.insert(0, str(_ROOT))

TINY_VOCAB = 96
TINY_SEQ = 48  # > 3x the llama3 config's original_max_position_embeddings, so rope scaling matters

# name -> (transformers config class name, kwargs). Llama-3.1 uses a small original_max_position_embeddings so that
# the llama3 frequency rescaling changes the rotations at the positions tested.
_COMMON = dict(
    vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
)  # fmt: skip
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama2": ("LlamaConfig", dict(_COMMON, num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3.1": (
        "LlamaConfig",
        dict(
            _COMMON,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),  # fmt: skip
    "qwen2-bias-untied": ("Qwen2Config", dict(_COMMON, tie_word_embeddings=False, rope_theta=1000000.0)),
    "qwen2-tied": ("Qwen2Config", dict(_COMMON, tie_word_embeddings=True, rope_theta=1000000.0)),
    "mistral": ("MistralConfig", dict(_COMMON, tie_word_embeddings=False, sliding_window=None, head_dim=16)),
    # A window shorter than the test sequence, so the local mask matters.
    "mistral-window": ("MistralConfig", dict(_COMMON, tie_word_embeddings=False, sliding_window=7, head_dim=16)),
}


def make_hf_config(family: str):
    import transformers

    cls_name, kwargs = TINY_CONFIGS[family]
    return getattr(transformers, cls_name)(**kwargs)


def make_tiny_hf_model(family: str, seed: int = 0):
    """A tiny transformers CausalLM with every parameter random (norms around 1, biases non-zero), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_hf_config(family), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_hf_models():
    """family -> tiny random transformers model (built once per session, lazily)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = make_tiny_hf_model(family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_tokens():
    import numpy as np

    return np.random.default_rng(0).integers(0, TINY_VOCAB, size=(2, TINY_SEQ)).astype(np.int32)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_hf_models) -> pathlib.Path:
    """A `save_pretrained(safe_serialization=True)` folder of the tiny Llama-2 model (treat as read-only)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_hf_models("llama2").save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> pathlib.Path:
    """The embedded SmolLM2-135M-Instruct GGUF; skips (fails under CI=1, which installs it) when not installed."""
    from spotlight_jax import defaults

    try:
        return defaults.default_gguf_path()
    except defaults.DefaultModelNotInstalledError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install the embedded model: {e}")
        pytest.skip(f"embedded model not installed ({defaults.DEFAULT_MODEL_INSTALL})")


@pytest.fixture(scope="session")
def smollm2_jax(smollm2_path):
    """(model, tokenizer, seconds load_model() took) for the embedded default, loaded once per session."""
    from spotlight_jax.convert import load_model

    start = time.perf_counter()
    model, tokenizer = load_model()
    return model, tokenizer, time.perf_counter() - start


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path):
    """transformers' PyTorch model loaded from the same GGUF (fp32, eval mode), once per session."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    ).eval()
