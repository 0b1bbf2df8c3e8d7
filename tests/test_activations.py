"""Activation cache: contents equal the model's post-RoPE q/k, resumable collection, clear errors, CLI end to end."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from spotlight_jax import activations as act_mod
from spotlight_jax.activations import ActivationCacheError, ActivationReader, collect_activations
from spotlight_jax.config import ModelConfig
from spotlight_jax.model import CausalLM

TINY = ModelConfig(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
    eos_token_ids=(2,), name="tiny-acts",
)  # fmt: skip
LAYERS = (2, 3)


@pytest.fixture(scope="module")
def model():
    return CausalLM(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def samples():
    return np.random.default_rng(0).integers(0, 256, (3, 80)).astype(np.int32)


def test_collect_matches_model(tmp_path, model, samples):
    reader = collect_activations(model, samples, tmp_path / "a", LAYERS, batch_size=2, progress=False)
    m = json.load(open(tmp_path / "a" / "manifest.json"))
    assert m["completed"] == 3 and m["layers"] == [2, 3] and m["seq_len"] == 80 and m["dtype"] == "bfloat16"
    assert m["model_name"] == "tiny-acts" and m["model_config"]["num_kv_heads"] == 2
    out = model(jnp.asarray(samples), return_qk=LAYERS)
    for layer in LAYERS:
        q, k = reader.get(layer, [2, 0])
        assert q.dtype == ml_dtypes.bfloat16 and q.shape == (2, 4, 80, 16) and k.shape == (2, 2, 80, 16)
        ref_q, ref_k = (np.asarray(x, np.float32) for x in out.qk[layer])
        # stored as bf16 (8 mantissa bits); eager vs jitted float32 may round to a neighbouring bf16 value
        np.testing.assert_allclose(q.astype(np.float32), ref_q[[2, 0]], rtol=1e-2, atol=1e-4)
        np.testing.assert_allclose(k.astype(np.float32), ref_k[[2, 0]], rtol=1e-2, atol=1e-4)
    assert isinstance(np.load(tmp_path / "a" / "layer_002_q.npy", mmap_mode="r"), np.memmap)
    assert reader.model_cfg == TINY


def test_resume_after_interrupt(tmp_path, model, samples, monkeypatch):
    ref = collect_activations(model, samples, tmp_path / "ref", LAYERS, progress=False)
    calls = {"n": 0}
    real = jax.device_get

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(x)

    monkeypatch.setattr(act_mod.jax, "device_get", flaky)
    with pytest.raises(KeyboardInterrupt):
        collect_activations(model, samples, tmp_path / "b", LAYERS, progress=False)
    monkeypatch.setattr(act_mod.jax, "device_get", real)
    assert json.load(open(tmp_path / "b" / "manifest.json"))["completed"] == 1
    with pytest.raises(ActivationCacheError, match="incomplete"):
        ActivationReader(tmp_path / "b")
    resumed = collect_activations(model, samples, tmp_path / "b", LAYERS, progress=False)
    for layer in LAYERS:
        for a, b in zip(ref.get(layer, [0, 1, 2]), resumed.get(layer, [0, 1, 2]), strict=True):
            np.testing.assert_array_equal(a, b)


def test_mismatch_and_bad_input(tmp_path, model, samples):
    collect_activations(model, samples, tmp_path / "a", LAYERS, progress=False)
    with pytest.raises(ActivationCacheError, match="tokens_sha256"):
        collect_activations(model, samples[:, ::-1].copy(), tmp_path / "a", LAYERS, progress=False)
    with pytest.raises(ActivationCacheError, match="layers"):
        collect_activations(model, samples, tmp_path / "a", (3,), progress=False)
    with pytest.raises(ValueError, match="integer array"):
        collect_activations(model, samples[0], tmp_path / "c", LAYERS, progress=False)
    with pytest.raises(ActivationCacheError, match="no manifest.json"):
        ActivationReader(tmp_path / "c") if os.path.isdir(tmp_path / "c") else ActivationReader(tmp_path)
    reader = ActivationReader(tmp_path / "a")
    with pytest.raises(ActivationCacheError, match="layer 1"):
        reader.get(1, [0])
    with pytest.raises(IndexError):
        reader.get(2, [5])


def test_train_cli_on_cached_activations(tmp_path, model, samples):
    from spotlight_jax.hashing import load_hashes
    from spotlight_jax.train import main

    collect_activations(model, samples, tmp_path / "acts", LAYERS, progress=False)
    rc = main([
        "--activations-dir", str(tmp_path / "acts"), "--out-dir", str(tmp_path / "run"), "--steps-per-layer", "3",
        "--bits", "32", "--hidden", "32", "--max-queries", "8", "--max-other", "16", "--min-query-position", "4",
        "--seq-len", "80", "--num-samples", "3", "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    stack = load_hashes(tmp_path / "run" / "hashes", TINY)
    assert stack.layers == LAYERS and stack.bits == 32
    meta = json.load(open(tmp_path / "run" / "hashes" / "hash_config.json"))
    assert meta["model_name"] == "tiny-acts" and meta["activation_samples"] == 3
    # a cache made for other settings is refused with a clear message
    assert (
        main(["--activations-dir", str(tmp_path / "acts"), "--out-dir", str(tmp_path / "r3"), "--seq-len", "64"]) == 2
    )
    assert main(["--activations-dir", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "r2"), "--seq-len", "80",
                 "--model", str(tmp_path / "no-model")]) == 2  # fmt: skip
