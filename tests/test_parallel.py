"""Tensor parallelism (spotlight_jax.parallel) on 2 virtual CPU devices: same tokens as one device.

The virtual devices must exist before jax starts, so the check runs in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=2.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from spotlight_jax.config import RetrievalConfig

SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    from flax import nnx
    from spotlight_jax import parallel
    from spotlight_jax.bench.decode import time_decode_steps, weight_bytes_per_step
    from spotlight_jax.config import ModelConfig, RetrievalConfig
    from spotlight_jax.generate import generate
    from spotlight_jax.hashing import HashConfig, HashStack
    from spotlight_jax.model import CausalLM

    assert len(jax.devices()) == 2, jax.devices()
    cfg = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=32, max_position_embeddings=512, tie_word_embeddings=False)
    model = CausalLM(cfg, rngs=nnx.Rngs(11))
    hashes = HashStack(cfg, HashConfig(kind="spotlight", bits=64), dense_layers=(0,), rngs=nnx.Rngs(2))
    mesh = parallel.tp_mesh(2)
    smodel, shashes = parallel.shard_model(model, mesh), parallel.shard_hashes(hashes, mesh)
    q = smodel.layers[1].attn.q_proj.kernel[...]
    assert q.addressable_shards[0].data.shape == (48, 64), q.addressable_shards[0].data.shape  # heads split
    assert weight_bytes_per_step(smodel, 1, per_device=True) < weight_bytes_per_step(model, 1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 64, n).tolist() for n in (40, 25, 33)]  # ragged
    for method in ("dense", "oracle", "linear", "spotlight"):
        h = HashStack(cfg, HashConfig(kind="linear", bits=64), dense_layers=(0,), rngs=nnx.Rngs(3)) \\
            if method == "linear" else hashes
        sh = parallel.shard_hashes(h, mesh)
        for extra in ({}, {"sink_tokens": 2}):
            base = dict(method=method, bits=64, keep_ratio=0.1, min_keep=3, dense_layers=(0,), **extra)
            a = generate(model, prompts, max_new_tokens=10, retrieval_cfg=RetrievalConfig(**base), hashes=h)
            b = generate(smodel, prompts, max_new_tokens=10, retrieval_cfg=RetrievalConfig(**base, mesh=mesh),
                         hashes=sh)
            assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens)), (method, extra, a.tokens, b.tokens)
    # The unfused decode ops per device (the loop above ran the default fused prologue, its XLA reference on the
    # CPU): the tokens of the unfused single device.
    base = dict(method="spotlight", bits=64, keep_ratio=0.1, min_keep=3, dense_layers=(0,), fused_prologue=False)
    a = generate(model, prompts, max_new_tokens=10, retrieval_cfg=RetrievalConfig(**base), hashes=hashes)
    b = generate(smodel, prompts, max_new_tokens=10, hashes=shashes, retrieval_cfg=RetrievalConfig(**base, mesh=mesh))
    assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens)), ("unfused prologue", a.tokens, b.tokens)
    rcfg = RetrievalConfig(method="spotlight", bits=64, dense_layers=(0,), mesh=mesh)
    res = time_decode_steps(smodel, cfg, 2, 64, 2, 1, rcfg, shashes)
    assert res["step_s"] > 0
    try:
        parallel.shard_model(CausalLM(ModelConfig(**{**cfg.to_dict(), "num_kv_heads": 1, "num_heads": 2}),
                                      rngs=nnx.Rngs(0)), mesh)
    except ValueError as e:
        assert "not divisible by tp=2" in str(e)
    else:
        raise AssertionError("indivisible heads accepted")
    print("TP_OK")
    """
)


def test_tensor_parallel_decode_equals_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "TP_OK" in proc.stdout, proc.stderr[-3000:]


def test_mesh_needs_a_tp_axis():
    with pytest.raises(ValueError, match="axis named 'tp'"):
        RetrievalConfig(method="spotlight", mesh=object())


def test_lm_head_split_only_when_the_vocabulary_divides():
    from jax.sharding import PartitionSpec as P

    from spotlight_jax.parallel import param_spec

    assert param_spec(("lm_head", "kernel"), (48, 256), 2) == P(None, "tp")
    assert param_spec(("lm_head", "kernel"), (48, 256), 3) == P()  # replicated, not an error
    assert param_spec(("layers", 3, "attn", "q_proj", "kernel"), (48, 96), 3) == P(None, "tp")
    assert param_spec(("layers", 3, "input_norm", "scale"), (48,), 3) == P()
