"""The fused decode prologue (RoPE + hash codes + K / V / code-cache writes) against its jnp reference and the
unfused ops the model runs otherwise (interpret mode on CPU, compiled on a GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import HashMLP, decode_prologue, decode_prologue_reference
from pallas_kernels.decode_prologue import rope_reference
from pallas_kernels.hash_mlp import hash_mlp_reference
from spotlight_jax.config import ModelConfig
from spotlight_jax.hashing import HashConfig, build_hash
from tests.kernel_test_base import INTERPRET

# (batch, G, KV heads, head_dim, bits, hash layers, dtype, with biases): GQA groups of the sweep, the three
# code lengths the hashes use, 1-3 layer MLPs (1 = LinearHash's form), bf16 and fp32 activations.
CASES = [
    (3, 1, 2, 64, 128, 2, jnp.float32, True),
    (2, 3, 3, 64, 128, 2, jnp.bfloat16, True),
    (1, 4, 2, 128, 128, 2, jnp.float32, True),
    (2, 7, 2, 128, 128, 2, jnp.bfloat16, True),
    (2, 8, 1, 32, 256, 3, jnp.float32, True),
    (3, 4, 2, 64, 32, 1, jnp.float32, False),
]


def _inputs(b, g, kv, h, bits, layers, dtype, bias, s=37, seed=0):
    """Kernel arguments and a hash MLP, drawn with numpy (eager JAX ops would compile per shape)."""
    gen = np.random.default_rng(seed)
    normal = lambda shape, dt=jnp.float32, scale=1.0: jnp.asarray(scale * gen.standard_normal(shape), dt)
    q, k, v = normal((b, g * kv, h), dtype), normal((b, kv, h), dtype), normal((b, kv, h), dtype)
    pos = np.array([0, s - 1, 17][:b], np.int32)  # first row, last row, one between
    angles = (pos[:, None] + 1000.0) / 10000.0 ** (np.arange(0, h, 2) / h)
    cos, sin = (jnp.asarray(np.concatenate([f(angles)] * 2, -1), jnp.float32) for f in (np.cos, np.sin))
    k_cache, v_cache = normal((b, kv, s, h), dtype), normal((b, kv, s, h), dtype)
    code_cache = jnp.asarray(gen.integers(0, 2**32, (b, kv, s, bits // 32), dtype=np.uint32))
    dims = (h,) + (h,) * (layers - 1) + (bits,)
    weights = tuple(normal((kv, a, c), scale=a**-0.5) for a, c in zip(dims[:-1], dims[1:], strict=True))
    biases = tuple(normal((kv, c), scale=0.1) if bias else None for c in dims[1:])
    mlp = HashMLP(weights, biases, silu_first=layers > 1, residual=layers > 1)
    return (q, k, v, cos, sin, jnp.asarray(pos), k_cache, v_cache, code_cache), mlp


@jax.jit
def _features(q_rot, k, cos, sin, mlp):
    """The hash features behind the reference's codes: queries [B, N, bits] and keys [B, K, bits]."""
    b, n, h = q_rot.shape
    kv = k.shape[1]
    q_feat = hash_mlp_reference(jnp.moveaxis(q_rot.reshape(b, kv, n // kv, h), 1, 0).reshape(kv, -1, h), mlp)
    k_rot = rope_reference(k, cos[:, None], sin[:, None])
    k_feat = hash_mlp_reference(jnp.moveaxis(k_rot, 1, 0), mlp)
    return jnp.moveaxis(q_feat.reshape(kv, b, n // kv, -1), 0, 1).reshape(b, n, -1), jnp.moveaxis(k_feat, 0, 1)


# Compiled, the kernel's hash dots run in TF32 (as XLA's fp32 dots do on the GPU by default): a bit may flip where
# its feature is within ~1e-3 of 0. Interpreted, both sides are fp32. The references run at full fp32 precision.
CODE_MARGIN = 1e-4 if INTERPRET else 1e-2


def _assert_codes_equal_up_to_margin(got, want, features, margin=CODE_MARGIN):
    """Codes equal except for bits whose feature is within `margin` of 0 (rounding may flip those)."""
    diff = np.asarray(got ^ want)  # [..., W]
    flipped = (diff[..., :, None] >> np.arange(32, dtype=np.uint32)) & 1  # [..., W, 32]
    flipped = flipped.reshape(*diff.shape[:-1], -1).astype(bool)
    assert not np.any(flipped & (np.abs(np.asarray(features)) > margin)), "code bits differ away from 0"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-g{c[1]}-k{c[2]}-h{c[3]}-bits{c[4]}-l{c[5]}")
@pytest.mark.parametrize("hashed", [True, False], ids=["hashed", "rope-only"])
def test_prologue_matches_reference(case, hashed):
    args, mlp = _inputs(*case)
    if not hashed:
        args, mlp = args[:-1] + (None,), None
    with jax.default_matmul_precision("highest"):
        want = decode_prologue_reference(*args, mlp)
    got = decode_prologue(*args, mlp, implementation="pallas", interpret=INTERPRET)
    dtype = case[6]
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == jnp.float32 else dict(atol=1e-2, rtol=1e-2)
    for name in ("q", "k_cache", "v_cache"):
        a, r = getattr(got, name), getattr(want, name)
        assert a.dtype == r.dtype and a.shape == r.shape, name
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r, np.float32), **tol, err_msg=name)
    b, pos = case[0], np.asarray(args[5])
    untouched = np.ones(args[6].shape[:3], bool)
    untouched[np.arange(b), :, pos] = False
    np.testing.assert_array_equal(np.asarray(got.k_cache)[untouched], np.asarray(args[6])[untouched])
    np.testing.assert_array_equal(np.asarray(got.v_cache)[untouched], np.asarray(args[7])[untouched])
    np.testing.assert_array_equal(np.asarray(got.v_cache)[~untouched], np.asarray(args[2]).reshape(-1, case[3]))
    if not hashed:
        assert got.q_codes is None and got.code_cache is None
        return
    np.testing.assert_array_equal(np.asarray(got.code_cache)[untouched], np.asarray(args[8])[untouched])
    with jax.default_matmul_precision("highest"):
        q_feat, k_feat = _features(want.q, args[1], args[3], args[4], mlp)
    rows = (np.arange(b), slice(None), pos)
    _assert_codes_equal_up_to_margin(got.q_codes, want.q_codes, q_feat)
    _assert_codes_equal_up_to_margin(np.asarray(got.code_cache)[rows], np.asarray(want.code_cache)[rows], k_feat)


@pytest.mark.parametrize("kind", ["spotlight", "linear"])
def test_prologue_codes_are_the_hash_modules_codes(kind):
    """A hash module's `mlp()` run by the kernel gives the codes its own `query_codes` / `key_codes` give."""
    cfg = ModelConfig(vocab_size=8, hidden_size=32, intermediate_size=32, num_layers=1, num_heads=8, num_kv_heads=2,
                      head_dim=64)  # fmt: skip
    module = build_hash(HashConfig(kind=kind, bits=128, init_scale=0.2), cfg, nnx.Rngs(4))
    args, _ = _inputs(2, 4, 2, 64, 128, 2, jnp.float32, True, seed=3)
    got = decode_prologue(*args, module.mlp(), implementation="pallas", interpret=INTERPRET)
    q, k, _, cos, sin, pos = args[:6]
    q_rot = rope_reference(q, cos[:, None], sin[:, None])
    k_rot = rope_reference(k, cos[:, None], sin[:, None])
    np.testing.assert_allclose(np.asarray(got.q), np.asarray(q_rot), atol=1e-6)
    k_new = np.asarray(got.code_cache)[np.arange(2), :, np.asarray(pos)]
    with jax.default_matmul_precision("highest"):
        _assert_codes_equal_up_to_margin(got.q_codes, module.query_codes(q_rot), module.query_features(q_rot))
        _assert_codes_equal_up_to_margin(k_new, module.key_codes(k_rot[:, :, None])[:, :, 0],
                                         module.key_features(k_rot[:, :, None])[:, :, 0])  # fmt: skip


def test_prologue_rejects_bad_inputs():
    args, mlp = _inputs(2, 4, 2, 64, 128, 2, jnp.float32, True)
    q, k, v, cos, sin, pos, kc, vc, cc = args
    with pytest.raises(ValueError, match="K dividing N"):
        decode_prologue(q[:, :7], k, v, cos, sin, pos, kc, vc, cc, mlp)
    with pytest.raises(ValueError, match="caches must be"):
        decode_prologue(q, k, v, cos, sin, pos, kc[:, :1], vc, cc, mlp)
    with pytest.raises(ValueError, match="cos / sin"):
        decode_prologue(q, k, v, cos[:, :32], sin, pos, kc, vc, cc, mlp)
    with pytest.raises(ValueError, match="both or neither"):
        decode_prologue(q, k, v, cos, sin, pos, kc, vc, cc, None)
    with pytest.raises(ValueError, match="code cache's"):
        decode_prologue(q, k, v, cos, sin, pos, kc, vc, cc[..., :2], mlp)
    odd = HashMLP((jnp.zeros((2, 64, 96)), jnp.zeros((2, 96, 128))), (None, None))
    with pytest.raises(ValueError, match="power of two"):
        decode_prologue(q, k, v, cos, sin, pos, kc, vc, cc, odd, implementation="pallas")
