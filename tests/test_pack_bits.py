import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import pack_bits, pack_bits_reference
from tests.kernel_test_base import INTERPRET, rng


def _pack_np(x: np.ndarray) -> np.ndarray:
    bits = (x > 0).reshape(*x.shape[:-1], x.shape[-1] // 32, 32).astype(np.uint64)
    return (bits << np.arange(32, dtype=np.uint64)).sum(-1).astype(np.uint32)


@pytest.mark.parametrize(
    "shape,dtype",
    [((3, 5, 32), jnp.float32), ((2, 7, 64), jnp.bfloat16), ((1, 3, 4, 128), jnp.float32), ((6, 256), jnp.float32)],
)
@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_pack_bits_matches_numpy(shape, dtype, implementation):
    x = rng(sum(shape)).standard_normal(shape).astype(np.float32)
    x[..., ::11] = 0.0  # exact zeros are "not > 0"
    xj = jnp.asarray(x, dtype)
    got = pack_bits(xj, implementation=implementation, interpret=INTERPRET)
    assert got.dtype == jnp.uint32 and got.shape == (*shape[:-1], shape[-1] // 32)
    np.testing.assert_array_equal(np.asarray(got), _pack_np(np.asarray(xj.astype(jnp.float32))))


def test_pack_bits_little_endian():
    x = -np.ones((1, 64), np.float32)
    x[0, 0] = x[0, 33] = x[0, 63] = 1.0
    got = np.asarray(pack_bits_reference(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.array([[1, (1 << 1) | (1 << 31)]], np.uint32))


def test_pack_bits_rejects_ragged_bits():
    with pytest.raises(ValueError):
        pack_bits(jnp.ones((2, 48)))
