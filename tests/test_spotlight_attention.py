import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dense_decode_attention_reference, spotlight_attention
from tests.kernel_test_base import INTERPRET, random_codes, rng


def _inputs(b, n, kv, s, h, bits, seed):
    gen = rng(seed)
    q = jnp.asarray(gen.standard_normal((b, n, h)), jnp.float32)
    kc = jnp.asarray(gen.standard_normal((b, kv, s, h)), jnp.float32)
    vc = jnp.asarray(gen.standard_normal((b, kv, s, h)), jnp.float32)
    qc = jnp.asarray(random_codes(gen, (b, n, bits // 32)))
    kcodes = jnp.asarray(random_codes(gen, (b, kv, s, bits // 32)))
    return q, kc, vc, qc, kcodes


@pytest.mark.parametrize(
    "b,n,kv,s,bits,lengths,kk,budget",
    [
        (2, 14, 2, 700, 128, (700, 301), 40, (55, 25)),  # budget above k: clamped in the kernel
        (1, 8, 1, 513, 64, (513,), 11, None),
    ],
)
def test_spotlight_pallas_matches_xla(b, n, kv, s, bits, lengths, kk, budget):
    args = _inputs(b, n, kv, s, 64, bits, seed=s)
    lengths = jnp.asarray(lengths, jnp.int32)
    budget = None if budget is None else jnp.asarray(budget, jnp.int32)
    want = spotlight_attention(*args, lengths, kk, budget, implementation="xla")
    got = spotlight_attention(*args, lengths, kk, budget, implementation="pallas", interpret=INTERPRET)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_spotlight_equals_dense_when_budget_covers_length():
    b, n, kv, s, h = 3, 8, 2, 300, 64
    args = _inputs(b, n, kv, s, h, 128, seed=9)
    lengths = jnp.asarray([3, 255, 300], jnp.int32)
    dense = dense_decode_attention_reference(*args[:3], lengths)
    for impl in ("xla", "pallas"):
        got = spotlight_attention(*args, lengths, 300, implementation=impl, interpret=INTERPRET)
        np.testing.assert_allclose(np.asarray(got), np.asarray(dense), rtol=1e-5, atol=1e-5)
