"""spotlight-jax: Spotlight Attention (arXiv 2508.19740) for JAX/Pallas.

Data flow (docs/design.md): convert (HF weights -> Flax NNX CausalLM) -> data -> activations (post-RoPE q/k)
-> train (hash MLPs, Bradley-Terry, orbax) -> generate (jitted decode with dense | oracle | linear | spotlight
retrieval, built on pallas_kernels) -> eval / bench.

Conversion, training and hashing are imported lazily.
"""

import importlib
import os

# torch is a test-only reference here (GGUF is read with the `gguf` package): transformers' advice that PyTorch is
# missing would greet every user of the torch-free install, so it is off unless the user set the variable.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from spotlight_jax.config import ModelConfig, RetrievalConfig

# Imported eagerly: the function shares its name with its module, and a lazy attribute would be shadowed by the
# submodule as soon as anything imports `spotlight_jax.generate`.
from spotlight_jax.generate import SamplingConfig, generate

_LAZY = {
    "CausalLM": "spotlight_jax.model",
    "KVCache": "spotlight_jax.model",
    "init_cache": "spotlight_jax.model",
    "load_model": "spotlight_jax.convert",
    "save_model": "spotlight_jax.checkpoint",
    "restore_model": "spotlight_jax.checkpoint",
    "SpotlightHash": "spotlight_jax.hashing",
    "LinearHash": "spotlight_jax.hashing",
    "load_hashes": "spotlight_jax.hashing",
}

__all__ = ["ModelConfig", "RetrievalConfig", "SamplingConfig", "generate", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spotlight_jax' has no attribute {name!r}")
