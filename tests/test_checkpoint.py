"""Orbax checkpoints of converted models: exact round trip, clear errors, faster than GGUF conversion."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax.numpy as jnp
import numpy as np
import pytest

from spotlight_jax import checkpoint
from spotlight_jax.checkpoint import CheckpointError, restore_model, save_model
from spotlight_jax.convert import load_model


@pytest.fixture(scope="module")
def tiny_model(tiny_hf_models):
    model, _ = load_model(tiny_hf_models("llama3.1"), tokenizer=False)
    return model


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    return save_model(tiny_model, tmp_path_factory.mktemp("ckpt") / "tiny")


def _logits(model, tokens):
    return np.asarray(model(jnp.asarray(tokens)).logits)


def test_round_trip_gives_identical_logits(tiny_model, saved, tiny_tokens):
    restored = restore_model(saved)
    assert restored.cfg == tiny_model.cfg  # rope_scaling tuples survive JSON
    np.testing.assert_array_equal(_logits(restored, tiny_tokens), _logits(tiny_model, tiny_tokens))
    via_load_model, tokenizer = load_model(saved)  # a checkpoint folder is also a load_model source
    assert tokenizer is None
    np.testing.assert_array_equal(_logits(via_load_model, tiny_tokens), _logits(tiny_model, tiny_tokens))


def test_restore_in_another_param_dtype(saved, tiny_model):
    restored = restore_model(saved, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    kernel = restored.layers[0].attn.q_proj.kernel[...]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(kernel), np.asarray(tiny_model.layers[0].attn.q_proj.kernel[...].astype(jnp.bfloat16))
    )


def test_save_refuses_to_overwrite(tiny_model, saved):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_model(tiny_model, saved)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*does not exist"):
        restore_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a spotlight_jax model checkpoint.*spotlight_model.json"):
        restore_model(tmp_path)


def test_config_mismatch(saved, tiny_model):
    other = dataclasses.replace(tiny_model.cfg, num_layers=3, rope_theta=10000.0)
    with pytest.raises(CheckpointError, match="different model config") as e:
        restore_model(saved, expected_config=other)
    assert "num_layers: checkpoint 2 vs expected 3" in str(e.value)
    assert "rope_theta" in str(e.value)
    restore_model(saved, expected_config=dataclasses.replace(tiny_model.cfg, name="renamed"))  # name is ignored


def test_corrupt_config_json(saved, tmp_path):
    import shutil

    copy = shutil.copytree(saved, tmp_path / "c")
    (copy / checkpoint.CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        restore_model(copy)


def test_params_not_matching_config(saved, tmp_path):
    """The JSON says one shape, the stored arrays another: orbax's error is wrapped into a clear one."""
    import shutil

    copy = shutil.copytree(saved, tmp_path / "c")
    meta = json.loads((copy / checkpoint.CONFIG_FILE).read_text())
    meta["model_config"]["intermediate_size"] *= 2
    (copy / checkpoint.CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="corrupt or does not match"):
        restore_model(copy)


def test_corrupt_params(saved, tmp_path):
    import shutil

    copy = shutil.copytree(saved, tmp_path / "c")
    shutil.rmtree(copy / checkpoint.PARAMS_DIR)
    with pytest.raises(CheckpointError, match="incomplete"):
        restore_model(copy)
    copy = shutil.copytree(saved, tmp_path / "d")
    # Truncate every data file orbax wrote: the arrays can no longer be read.
    for root, _, files in os.walk(copy / checkpoint.PARAMS_DIR):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(max(0, os.path.getsize(path) // 3))
    with pytest.raises(CheckpointError, match="could not restore parameters"):
        restore_model(copy)


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_checkpoint_round_trip(smollm2_jax, tmp_path):
    model, tokenizer, gguf_seconds = smollm2_jax
    path = save_model(model, tmp_path / "smollm2", tokenizer=tokenizer)
    start = time.perf_counter()
    restored = restore_model(path)
    restore_seconds = time.perf_counter() - start
    print(f"\nSmolLM2: load_model() from GGUF {gguf_seconds:.1f} s, restore_model() {restore_seconds:.1f} s")
    # Tests never assert on wall time (the restore and GGUF load times are printed for whoever reads the log).
    _, saved_tokenizer = load_model(path)  # model + tokenizer from the checkpoint folder alone
    text = "def f(x):\n    return x ** 2  # SmolLM2"
    assert saved_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    tokens = np.asarray(tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"])[None]
    np.testing.assert_array_equal(_logits(restored, tokens), _logits(model, tokens))
