"""Shared helpers for the Pallas kernels: backend selection, interpret flag, Triton compiler params.

Every public op in this package takes ``implementation="xla" | "pallas" | None`` and ``interpret``:
``None`` means Pallas on GPU and the pure-XLA reference elsewhere. Tests force ``"pallas"`` and run
the kernels in interpret mode on CPU (see :func:`default_interpret`).
"""

from __future__ import annotations

import os
import warnings

import jax
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


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def prev_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n.bit_length() - 1)
