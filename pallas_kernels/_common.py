"""Shared helpers for the Pallas kernels: backend selection, interpret flag, Triton compiler params.

Every public op in this package takes ``implementation="xla" | "pallas" | None`` and ``interpret``:
``None`` means Pallas on GPU and the pure-XLA reference elsewhere. Tests force ``"pallas"`` and run
the kernels in interpret mode on CPU (see :func:`default_interpret`).
"""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu_triton

# The Pallas Triton backend warns that it is deprecated in favour of Mosaic GPU. Mosaic GPU has
# neither popcount nor vector-index gathers on sm_90 (see shared/GPU.md), so we stay on Triton.
warnings.filterwarnings("ignore", message=".*[Tt]riton.*", category=DeprecationWarning)

Implementation = str  # "xla" | "pallas"
_IMPLEMENTATIONS = ("xla", "pallas")


def default_implementation() -> Implementation:
    """``"pallas"`` when the default backend is a GPU, else ``"xla"``."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def resolve_implementation(implementation: Implementation | None) -> Implementation:
    if implementation is None:
        return default_implementation()
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS} or None, got {implementation!r}")
    return implementation


def default_interpret() -> bool:
    """Interpret flag for tests: ``$SPOTLIGHT_PALLAS_INTERPRET`` if set, else True unless on a GPU."""
    env = os.environ.get("SPOTLIGHT_PALLAS_INTERPRET")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "")
    return jax.default_backend() != "gpu"


def triton_params(num_warps: int | None = None, num_stages: int | None = None):
    """``CompilerParams`` of the Pallas Triton lowering (same name in jax 0.10.2 and 0.11.x)."""
    return plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cdiv_traced(a, b):
    """Ceiling division of traced integers inside a kernel (the form the Triton lowering was tested with)."""
    return (a + b - 1) // b


# ------------------------------------------------------------------------------------------------
# Flash-decoding pieces shared by the dense and the sparse decode-attention kernels.

NEG = -1e30  # finite "minus infinity": keeps exp() and max() NaN-free for empty blocks


def softmax_init(rows: int, head_dim: int):
    """Empty running state (o [rows, H], m [rows], l [rows]) of an online softmax."""
    return (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), NEG, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


def online_softmax_step(q, kb, vb, ok, carry, scale: float | None = None):
    """One block of an online softmax: q [R, H] against rows kb / vb [BS, H] where ok [BS] -> new (o, m, l).

    fp32 accumulation (IEEE dots for fp32 inputs). ``scale`` multiplies the fp32 logits (None: q is pre-scaled).
    """
    o, m, l_sum = carry
    logits = lax.dot_general(
        q, kb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST
    )  # [R, BS]
    if scale is not None:
        logits = logits * scale
    logits = jnp.where(ok[None, :], logits, NEG)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))  # [R]
    p = jnp.where(ok[None, :], jnp.exp(logits - m_new[:, None]), 0.0)  # [R, BS]
    alpha = jnp.exp(m - m_new)
    l_new = alpha * l_sum + jnp.sum(p, axis=1)
    pv = lax.dot_general(
        p.astype(vb.dtype), vb, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
        precision=lax.Precision.HIGHEST,
    )  # [R, H]  # fmt: skip
    return alpha[:, None] * o + pv, m_new, l_new


def combine_partials(o, m, l_sum):
    """Merge split-k partials: o [BK, C, R, H], m / l [BK, C, R] -> [BK, R, H] fp32 (zeros where nothing was live)."""
    m_all = jnp.max(m, axis=1, keepdims=True)  # [BK, 1, R]
    w = jnp.exp(m - m_all)  # [BK, C, R]
    num = jnp.sum(w[..., None] * o, axis=1)  # [BK, R, H]
    den = jnp.sum(w * l_sum, axis=1)  # [BK, R]
    return jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def prev_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n.bit_length() - 1)
