"""Hash modules: shapes, GQA head mapping, packing convention, init behaviour, export/load validation."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spotlight_jax.config import ModelConfig, RetrievalConfig
from spotlight_jax.hashing import (
    HashCheckpointError,
    HashConfig,
    HashStack,
    LinearHash,
    SpotlightHash,
    export_hashes,
    load_hashes,
    pack_bits_reference,
)

CFG = ModelConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=5, num_heads=6, num_kv_heads=2, head_dim=32,
    name="tiny-hash",
)  # fmt: skip
B, T = 2, 11


def _qk(seed=0, h=32, n=6, k=2):
    kq, kk = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kq, (B, n, T, h)), jax.random.normal(kk, (B, k, T, h))


def _np_pack(x):
    bits = (np.asarray(x) > 0).astype(np.uint64)
    w = bits.shape[-1] // 32
    bits = bits.reshape(*bits.shape[:-1], w, 32)
    return (bits << np.arange(32, dtype=np.uint64)).sum(-1).astype(np.uint32)


@pytest.mark.parametrize("bits", [32, 64, 128, 256])
def test_spotlight_shapes_and_packing(bits):
    h = SpotlightHash(2, 32, num_heads=6, bits=bits, init_scale=0.1, rngs=nnx.Rngs(0))
    q, k = _qk()
    w = bits // 32
    assert h.key_codes(k).shape == (B, 2, T, w) and h.key_codes(k).dtype == jnp.uint32
    assert h.query_codes(q).shape == (B, 6, T, w)
    assert h.query_codes(q[:, :, 0]).shape == (B, 6, w)  # decode-step queries [B, N, H]
    np.testing.assert_array_equal(h.key_codes(k), _np_pack(h.key_features(k)))
    np.testing.assert_array_equal(h.codes(k), h.key_codes(k))
    soft = h.soft_key_codes(k, 64.0)
    assert soft.shape == (B, 2, T, bits) and float(jnp.max(jnp.abs(soft))) < 1
    np.testing.assert_array_equal(np.asarray(soft) > 0, np.asarray(h.key_features(k)) > 0)


def test_query_head_uses_its_kv_heads_mlp():
    h = SpotlightHash(2, 32, num_heads=6, bits=64, init_scale=0.3, rngs=nnx.Rngs(1))
    q, _ = _qk(1)
    fq = h.query_features(q)  # [B, 6, T, 64]
    for j in range(6):
        as_keys = jnp.stack([q[:, j]] * 2, axis=1)  # head j's queries placed at both KV heads
        fk = h.key_features(as_keys)
        np.testing.assert_allclose(fq[:, j], fk[:, j // 3], rtol=1e-5, atol=1e-6)
        np.testing.assert_raises(AssertionError, np.testing.assert_allclose, fq[:, j], fk[:, 1 - j // 3], 1e-5)


def test_default_dims_and_init():
    h64 = SpotlightHash(3, 64, num_heads=9, rngs=nnx.Rngs(0))  # SmolLM2 heads
    assert h64.dims == (64, 128, 128) and h64.key_mlp.weights[0][...].shape == (3, 64, 128)
    h128 = SpotlightHash(4, 128, num_heads=28, rngs=nnx.Rngs(0))  # paper: 128->128->128, residual
    assert h128.dims == (128, 128, 128)
    x = jax.random.normal(jax.random.key(0), (1, 4, 50, 128))
    # with init scale 1e-3 and residuals the untrained hash is ~identity: codes ~= sign(x)
    agree = np.mean(np.asarray(h128.key_features(x) > 0) == np.asarray(x > 0))
    assert agree > 0.99
    sep = SpotlightHash(2, 32, num_heads=6, bits=32, separate_query_mlp=True, rngs=nnx.Rngs(0))
    assert sep.query_mlp.weights[0][...].shape == (6, 32, 128)
    assert sep.query_codes(_qk()[0]).shape == (B, 6, T, 1)
    with pytest.raises(ValueError, match="bits"):
        SpotlightHash(2, 32, bits=96, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="head_dim"):
        h64.key_codes(x)


def test_linear_hash():
    lh = LinearHash(2, 32, num_heads=6, bits=1024, rngs=nnx.Rngs(0))
    q, k = _qk(2)
    assert lh.key_codes(k).shape == (B, 2, T, 32) and lh.query_codes(q).shape == (B, 6, T, 32)
    proj = np.asarray(lh.projection[...])
    ref = _np_pack(np.einsum("bkth,khc->bktc", np.asarray(k), proj))
    np.testing.assert_array_equal(lh.key_codes(k), ref)
    refq = _np_pack(np.einsum("bnth,nhc->bntc", np.asarray(q), np.repeat(proj, 3, axis=0)))
    np.testing.assert_array_equal(lh.query_codes(q), refq)
    assert not nnx.state(lh, nnx.Param)  # nothing trainable


def test_hamming_scores_on_codes():
    from pallas_kernels import hamming_scores

    h = SpotlightHash(2, 32, num_heads=6, bits=128, init_scale=0.2, rngs=nnx.Rngs(0))
    q, k = _qk(3)
    s = np.asarray(hamming_scores(h.query_codes(q[:, :, -1]), h.key_codes(k)))  # [B, K, T]
    fq, fk = np.asarray(h.query_features(q[:, :, -1])) > 0, np.asarray(h.key_features(k)) > 0
    ref = np.zeros((B, 2, T), np.int64)
    for j in range(6):
        ref[:, j // 3] += (fq[:, j, None, :] == fk[:, j // 3]).sum(-1)
    np.testing.assert_array_equal(s, ref)
    np.testing.assert_array_equal(pack_bits_reference(fk.astype(np.float32)), _np_pack(fk))


def test_stack_export_load_and_errors(tmp_path):
    stack = HashStack(CFG, HashConfig(bits=64, hidden=64), rngs=nnx.Rngs(0))
    assert stack.layers == (2, 3, 4)
    with pytest.raises(KeyError, match="layer 1"):
        stack.for_layer(1)
    path = export_hashes(tmp_path / "h", stack, {"training_data": {"source": "unit"}})
    meta = json.load(open(os.path.join(path, "hash_config.json")))
    assert meta["layers"] == [2, 3, 4] and meta["dims"] == [32, 64, 64] and meta["num_kv_heads"] == 2
    loaded = load_hashes(path, CFG, RetrievalConfig(method="spotlight", bits=64))
    _, k = _qk(4)
    for i in stack.layers:
        np.testing.assert_array_equal(loaded.for_layer(i).key_codes(k), stack.for_layer(i).key_codes(k))

    other = [
        (ModelConfig(**{**CFG.__dict__, "num_kv_heads": 3}), "num_kv_heads"),
        (ModelConfig(**{**CFG.__dict__, "head_dim": 64}), "head_dim"),
        (ModelConfig(**{**CFG.__dict__, "num_layers": 6}), "num_layers"),
    ]
    for cfg, word in other:
        with pytest.raises(HashCheckpointError, match=word):
            load_hashes(path, cfg)
    with pytest.raises(HashCheckpointError, match="64-bit"):
        load_hashes(path, CFG, RetrievalConfig(method="spotlight", bits=128))
    with pytest.raises(HashCheckpointError, match=r"no hash for layers \[1\]"):
        load_hashes(path, CFG, RetrievalConfig(method="spotlight", bits=64, dense_layers=(0,)))
    with pytest.raises(HashCheckpointError, match="not an exported"):
        load_hashes(tmp_path / "missing", CFG)
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / "hash_config.json").write_text("{not json")
    with pytest.raises(HashCheckpointError, match="corrupt"):
        load_hashes(bad, CFG)
    shutil.rmtree(bad)
    shutil.copytree(path, bad)
    shutil.rmtree(bad / "params")
    with pytest.raises(HashCheckpointError, match="params"):
        load_hashes(bad, CFG)


def test_recall_eval_and_dispatcher(tmp_path):
    from spotlight_jax.activations import synthetic_activations
    from spotlight_jax.eval import subcommands
    from spotlight_jax.eval.recall import evaluate, overlap, write_outputs

    sel = jnp.array([[True, True, False, False]])
    orc = jnp.array([[True, False, True, False]])
    rec, iou = overlap(sel, orc)
    assert float(rec[0]) == 0.5 and abs(float(iou[0]) - 1 / 3) < 1e-6

    acts = synthetic_activations(CFG, [2, 3], num_samples=2, seq_len=256, seed=1)
    lin = {i: LinearHash(2, 32, num_heads=6, bits=1024, rngs=nnx.Rngs(i)) for i in (2, 3)}
    res = evaluate(acts, {"linear-1024": lin.__getitem__, "random": "random"}, [2, 3], queries=32, min_position=128,
                   keep_ratio=0.05, min_keep=4, progress=False)  # fmt: skip
    for layer in (2, 3):
        assert res["linear-1024"][layer]["recall"] > res["random"][layer]["recall"] + 0.1
        assert 0 <= res["random"][layer]["iou"] <= res["random"][layer]["recall"] <= 1
    info = {"keep_ratio": 0.05, "samples": 2, "seq_len": 256, "queries": 32, "min_position": 128, "min_keep": 4}
    files = write_outputs(str(tmp_path / "recall_test"), res, {"linear-1024": 1024}, info)
    assert all(os.path.getsize(f) > 0 for f in files.values())
    assert "recall" in subcommands()
