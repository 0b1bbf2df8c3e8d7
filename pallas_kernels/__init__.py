"""Pallas (Triton) GPU kernels for Spotlight Attention decoding, each with a pure-XLA reference.

- :func:`pack_bits`: signs -> little-endian packed uint32 codes.
- :func:`hamming_scores` / :func:`hamming_topk`: XNOR-popcount retrieval scores and exact top-k
  selection by counting (no sort).
- :func:`sparse_decode_attention`: exact softmax decode attention over gathered selected rows.
- :func:`decode_attention`: dense flash-decoding attention over the whole live KV cache.
- :func:`spotlight_attention`: the two composed (one decode step of one layer).
- :func:`flash_attention`: causal flash attention of a prefill chunk over the KV cache.
- :func:`decode_prologue`: a decode step's RoPE, hash codes and K / V / code-cache writes in one kernel.
- :class:`HashMLP` / :func:`hash_mlp_reference`: the trained hash module's layers and forward pass.
"""

from pallas_kernels._common import default_implementation, default_interpret, resolve_implementation
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.decode_prologue import Prologue, decode_prologue, decode_prologue_reference
from pallas_kernels.flash_attention import flash_attention, flash_attention_reference
from pallas_kernels.hamming_topk import (
    TopK,
    hamming_scores,
    hamming_scores_reference,
    hamming_topk,
    hamming_topk_reference,
)
from pallas_kernels.hash_mlp import HashMLP, hash_mlp_reference
from pallas_kernels.pack_bits import pack_bits, pack_bits_reference
from pallas_kernels.sparse_decode_attention import (
    dense_decode_attention_reference,
    sparse_decode_attention,
    sparse_decode_attention_reference,
)
from pallas_kernels.spotlight_attention import spotlight_attention, spotlight_attention_reference

__all__ = [
    "HashMLP",
    "hash_mlp_reference",
    "Prologue",
    "decode_prologue",
    "decode_prologue_reference",
    "TopK",
    "decode_attention",
    "decode_attention_reference",
    "default_implementation",
    "dense_decode_attention_reference",
    "flash_attention",
    "flash_attention_reference",
    "default_interpret",
    "hamming_scores",
    "hamming_scores_reference",
    "hamming_topk",
    "hamming_topk_reference",
    "pack_bits",
    "pack_bits_reference",
    "resolve_implementation",
    "sparse_decode_attention",
    "sparse_decode_attention_reference",
    "spotlight_attention",
    "spotlight_attention_reference",
]
