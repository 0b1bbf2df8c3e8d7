"""spotlight-jax: Spotlight Attention (arXiv 2508.19740) for JAX/Pallas.

Data flow (DESIGN.md §3): convert (HF weights -> Flax NNX CausalLM) -> data -> activations (post-RoPE q/k)
-> train (hash MLPs, Bradley-Terry, orbax) -> generate (jitted decode with dense | oracle | linear | spotlight
retrieval, built on pallas_kernels) -> eval / bench.

Heavy submodules are imported lazily so `import spotlight_jax` stays cheap.
"""

import importlib

from spotlight_jax.config import ModelConfig, RetrievalConfig

_LAZY = {
    "CausalLM": "spotlight_jax.model",
    "KVCache": "spotlight_jax.model",
    "init_cache": "spotlight_jax.model",
    "generate": "spotlight_jax.generate",
    "SamplingConfig": "spotlight_jax.generate",
    "load_model": "spotlight_jax.convert",
    "save_model": "spotlight_jax.checkpoint",
    "restore_model": "spotlight_jax.checkpoint",
    "SpotlightHash": "spotlight_jax.hashing",
    "LinearHash": "spotlight_jax.hashing",
    "load_hashes": "spotlight_jax.hashing",
}

__all__ = ["ModelConfig", "RetrievalConfig", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spotlight_jax' has no attribute {name!r}")
