"""Shared test settings for the Pallas kernels.

``INTERPRET`` is True on CPU (CI) and False on a GPU, so the same tests check the compiled Triton
kernels there (``SPOTLIGHT_PALLAS_INTERPRET=0|1`` overrides).
"""

import warnings

import numpy as np

from pallas_kernels import default_interpret

warnings.filterwarnings("ignore", message=".*[Tt]riton.*", category=DeprecationWarning)

INTERPRET = default_interpret()


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def random_codes(gen: np.random.Generator, shape, distinct: int | None = None) -> np.ndarray:
    """Random uint32 words; with ``distinct`` the last-axis vectors come from a small pool (ties)."""
    if distinct is None:
        return gen.integers(0, 2**32, shape, dtype=np.uint32)
    pool = gen.integers(0, 2**32, (distinct, shape[-1]), dtype=np.uint32)
    return pool[gen.integers(0, distinct, shape[:-1])]


def popcount_np(x: np.ndarray) -> np.ndarray:
    """Popcount of uint32 words, independent of JAX."""
    x = x.astype(np.uint64)
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1).astype(np.int64)


def scores_np(q_codes: np.ndarray, k_codes: np.ndarray) -> np.ndarray:
    """int [B, K, S]: group sum of XNOR popcounts, GQA head j -> KV head j // G."""
    b, n, w = q_codes.shape
    kv = k_codes.shape[1]
    g = n // kv
    out = np.zeros(k_codes.shape[:3], np.int64)
    for j in range(n):
        x = ~(q_codes[:, j, None, :] ^ k_codes[:, j // g])  # [B, S, W]
        out[:, j // g] += popcount_np(x).sum(-1)
    return out
