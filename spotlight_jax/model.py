"""Flax NNX decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5) with a preallocated KV cache.

Prefill chunks and decode steps share one code path. A prefill chunk (T tokens at positions offset..offset+T-1 of
every row) writes its keys / values (and key codes) into the cache at `offset`, then attends causally to the cache
so far through `pallas_kernels.flash_attention`, which never materialises more than one tile of scores; a cache-free
forward attends the same way over its own keys. A decode step writes its key/value at each row's own position and
calls `retrieval.decode_attention`, which picks dense, oracle, linear, spotlight or quest retrieval from a static
`RetrievalConfig`. `spotlight_jax.prefill` runs a whole prompt as a loop of chunks.

Legend: B batch, T query len, S cache len, N q-heads, K kv-heads, G group, H head_dim, D embed, V vocab, W words.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import resolve_implementation
from pallas_kernels.decode_prologue import decode_prologue, rope_reference, rope_tables, write_rows
from pallas_kernels.decode_prologue import supports_pallas as prologue_fits
from pallas_kernels.flash_attention import flash_attention
from spotlight_jax import retrieval
from spotlight_jax.config import ModelConfig, PrefillConfig, RetrievalConfig


class KVCache(NamedTuple):
    """Per-layer caches preallocated for `max_len` tokens; rows are right-padded, `lengths` says what is live."""

    k: tuple[jax.Array, ...]  # per layer [B, K, S, H]
    v: tuple[jax.Array, ...]  # per layer [B, K, S, H]
    codes: tuple[jax.Array | None, ...]  # per layer [B, K, S, W] uint32 key codes (None on dense layers)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> dict[str, int]:
        kv = sum(x.nbytes for x in self.k) + sum(x.nbytes for x in self.v)
        codes = sum(x.nbytes for x in self.codes if x is not None)
        return {"kv": kv, "codes": codes}


def init_cache(
    cfg: ModelConfig,
    batch: int,
    max_len: int,
    dtype: Any = jnp.float32,
    retrieval_cfg: RetrievalConfig | None = None,
) -> KVCache:
    """Zeroed cache; code caches exist only on layers that retrieve through binary codes."""
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    words = retrieval_cfg.bits // 32 if retrieval_cfg is not None else 0
    uses_codes = retrieval_cfg is not None and retrieval_cfg.method in retrieval.CODE_METHODS
    codes = tuple(
        jnp.zeros((batch, cfg.num_kv_heads, max_len, words), jnp.uint32)
        if uses_codes and retrieval_cfg.is_sparse_layer(i)
        else None
        for i in range(cfg.num_layers)
    )
    return KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
        codes=codes,
    )


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] fp32 (or [B, 1, V] with logits="last")
    cache: KVCache | None
    qk: dict[int, tuple[jax.Array, jax.Array]] | None  # layer -> (q [B, N, T, H], k [B, K, T, H]) post-RoPE


# ----------------------------------------------------------------------------------------------------------------------
# RoPE (fp32), with Llama-3 frequency scaling.


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [H/2] in fp32, rescaled as HF `_compute_llama3_parameters` when rope_scaling is llama3."""
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    scaling = cfg.rope_scaling_dict
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE (HF convention). x [B, heads, T, H], positions [B, T]."""
    cos, sin = rope_tables(positions[:, None], inv_freq)  # [B, 1, T, H]
    return rope_reference(x, cos, sin)


# ----------------------------------------------------------------------------------------------------------------------
# Modules.


class RMSNorm(nnx.Module):
    """RMSNorm computed in fp32, cast back to the activation dtype (as HF Llama/Qwen2)."""

    def __init__(self, dim: int, eps: float, *, param_dtype: Any = jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...].astype(jnp.float32) * xf.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


def _linear(din: int, dout: int, bias: bool, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg, self.layer = cfg, layer
        n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = _linear(d, n * h, cfg.attention_bias, dtype, param_dtype, rngs)
        self.k_proj = _linear(d, k * h, cfg.attention_bias, dtype, param_dtype, rngs)
        self.v_proj = _linear(d, k * h, cfg.attention_bias, dtype, param_dtype, rngs)
        self.o_proj = _linear(n * h, d, False, dtype, param_dtype, rngs)

    def __call__(self, x, positions, inv_freq, lengths, cache_kv, retrieval_cfg, hash_module, offset, prefill_cfg):
        """x [B, T, D], positions [B, T], lengths [B] (live tokens after this call); `offset` (int32 scalar or None):
        this call is a prefill chunk whose tokens sit at offset..offset+T-1 in every row."""
        cfg = self.cfg
        b, t, _ = x.shape
        n, kh, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_pre = self.q_proj(x).reshape(b, t, n, h).transpose(0, 2, 1, 3)  # [B, N, T, H] before RoPE
        k_pre = self.k_proj(x).reshape(b, t, kh, h).transpose(0, 2, 1, 3)  # [B, K, T, H]
        v = self.v_proj(x).reshape(b, t, kh, h).transpose(0, 2, 1, 3)  # [B, K, T, H]
        q = apply_rope(q_pre, positions, inv_freq)  # (unused, so not computed, on the fused decode path)
        k = apply_rope(k_pre, positions, inv_freq)
        scale = 1.0 / math.sqrt(h)

        new_cache = None
        attend = functools.partial(
            flash_attention,
            scale=scale,
            window=cfg.sliding_window,
            implementation=prefill_cfg.attention_impl(retrieval_cfg),
        )
        if cache_kv is None:  # a cache-free forward (activation collection, tests): causal over its own keys
            out = attend(q, k, v, jnp.int32(0), lengths)  # [B, N, T, H]
        elif offset is not None:
            # A prefill chunk: write its keys / values / key codes at `offset`, then attend causally to the cache so
            # far (the chunk's own keys included). Prefill is dense for every method; the codes are for the decode.
            ck, cv, codes = cache_kv
            at = (0, 0, offset, 0)
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), at)
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), at)
            if codes is not None:
                codes = jax.lax.dynamic_update_slice(codes, hash_module.key_codes(k), at)
            new_cache = (ck, cv, codes)
            out = attend(q.astype(ck.dtype), ck, cv, offset, lengths)  # [B, N, T, H]
        else:
            if cfg.sliding_window is not None and retrieval_cfg.method != "dense":
                raise NotImplementedError("sparse retrieval on a sliding-window model: use method='dense'")
            step = functools.partial(
                _decode_step, layer=self.layer, scale=scale, cfg=retrieval_cfg, window=cfg.sliding_window
            )
            if _fused_prologue(retrieval_cfg, hash_module, h):  # RoPE, hashing and cache writes in one kernel
                rope = rope_tables(positions[:, 0], inv_freq)  # [B, H] each
                args = (q_pre, k_pre, v, cache_kv, positions[:, 0], lengths, hash_module, rope)
            else:  # each row writes at its own position
                args = (q, k, v, cache_kv, positions[:, 0], lengths, hash_module, None)
            if retrieval_cfg.mesh is not None:  # tensor parallel: each device runs the step on its heads
                from spotlight_jax.sharding import sharded_decode

                out, new_cache = sharded_decode(step, retrieval_cfg.mesh, *args)
            else:
                out, new_cache = step(*args)
        out = out.transpose(0, 2, 1, 3).reshape(b, t, n * h).astype(x.dtype)
        return self.o_proj(out), new_cache, (q, k)


def _fused_prologue(cfg: RetrievalConfig, hash_module, head_dim: int) -> bool:
    """Whether a decode step runs `pallas_kernels.decode_prologue`: asked for, the layer's hash (if any) has one key
    function for keys and queries, and on the Pallas path the kernel's tiles fit (else the unfused XLA ops run)."""
    if not cfg.fused_prologue:
        return False
    mlp = None if hash_module is None else hash_module.mlp()
    if hash_module is not None and mlp is None:
        return False
    return resolve_implementation(cfg.implementation) == "xla" or prologue_fits(head_dim, mlp)


def _decode_step(q, k, v, cache_kv, pos, lengths, hash_module, rope, *, layer, scale, cfg, window):
    """One decode token: write its k / v (and key codes) at `pos`, then attend (retrieval per `cfg`).

    q [B, N, 1, H], k / v [B, K, 1, H], cache_kv (k, v [B, K, S, H], codes [B, K, S, W] or None), pos / lengths [B]
    -> (out [B, N, 1, H] fp32, new cache_kv). Works on any subset of heads (tensor-parallel shards).
    With `rope` = (cos, sin) [B, H], q and k come before RoPE and `decode_prologue` rotates, hashes and writes them
    in one kernel; with None they are rotated already and XLA's ops do the same (a cache write, as any write of
    unique rows, is one scatter: XLA updates the loop-carried cache in place).
    """
    ck, cv, codes = cache_kv
    q_codes = None
    if rope is not None:
        mlp = None if codes is None else hash_module.mlp()
        q1, q_codes, ck, cv, codes = decode_prologue(
            q[:, :, 0], k[:, :, 0], v[:, :, 0], *rope, pos, ck, cv, codes, mlp, implementation=cfg.implementation
        )
    else:
        q1 = q[:, :, 0]
        ck, cv = write_rows(ck, k[:, :, 0], pos), write_rows(cv, v[:, :, 0], pos)
        if codes is not None:
            codes = write_rows(codes, hash_module.key_codes(k)[:, :, 0], pos)
    out = retrieval.decode_attention(
        q1, ck, cv, lengths, scale, layer=layer, cfg=cfg, code_cache=codes, hash_module=hash_module,
        window=window, q_codes=q_codes,
    )  # fmt: skip
    return out[:, :, None], (ck, cv, codes)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(d, f, False, dtype, param_dtype, rngs)
        self.up_proj = _linear(d, f, False, dtype, param_dtype, rngs)
        self.down_proj = _linear(f, d, False, dtype, param_dtype, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = Attention(cfg, layer, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, positions, inv_freq, lengths, cache_kv, retrieval_cfg, hash_module, offset, prefill_cfg):
        a, new_cache, qk = self.attn(
            self.input_norm(x), positions, inv_freq, lengths, cache_kv, retrieval_cfg, hash_module, offset, prefill_cfg
        )
        x = x + a
        x = x + self.mlp(self.post_norm(x))
        return x, new_cache, qk


def check_token_ids(tokens: Any, vocab_size: int) -> None:
    """Refuse float, negative or out-of-vocabulary ids when their values are known (outside jit). An embedding
    lookup would clamp them to a valid row and return plausible logits for a token nobody asked for."""
    if isinstance(tokens, jax.core.Tracer):
        return  # traced: the caller checked the concrete ids (generate, collect_activations)
    arr = np.asarray(tokens)
    if arr.ndim != 2:
        raise ValueError(f"tokens must be a [batch, length] array of token ids, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got {arr.dtype} values: tokenise the text first")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)].flat[0]
        raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {vocab_size}): wrong tokenizer?")


class CausalLM(nnx.Module):
    """Decoder-only LM. Parameter names mirror HF's so that `convert.KEY_TABLE` stays a short declarative table."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs=None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = dtype
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List(
            [DecoderLayer(cfg, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for i in range(cfg.num_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else _linear(cfg.hidden_size, cfg.vocab_size, False, dtype, param_dtype, rngs)
        )

    def __call__(
        self,
        tokens: jax.Array,  # [B, T] int32
        positions: jax.Array | None = None,  # [B, T] int32; default arange(T)
        cache: KVCache | None = None,
        lengths: jax.Array | None = None,  # [B] live tokens per row after this call; default T
        *,
        retrieval_cfg: RetrievalConfig | None = None,
        hashes: Any = None,  # hashing.HashStack (or anything with .for_layer(i)) for code-based retrieval
        return_qk: bool | tuple[int, ...] = False,
        logits: str = "all",  # "all" -> [B, T, V]; "last" -> [B, 1, V] at each row's last live token
        cache_offset: jax.Array | int | None = None,  # prefill chunk at this position (see below)
        prefill_cfg: PrefillConfig | None = None,
    ) -> ModelOutput:
        """With a cache, a call is a prefill chunk when `cache_offset` is given (its tokens at positions
        cache_offset.. of every row; dense causal attention over the cache so far) and a decode step when it is not
        and T == 1. T > 1 without `cache_offset` is a prefill chunk at 0 (the whole prompt in one chunk)."""
        check_token_ids(tokens, self.cfg.vocab_size)
        b, t = tokens.shape
        if cache is not None and cache_offset is None and t > 1:
            cache_offset = 0
        if cache_offset is not None:
            cache_offset = jnp.asarray(cache_offset, jnp.int32)
            if positions is None:
                positions = jnp.broadcast_to(cache_offset + jnp.arange(t, dtype=jnp.int32), (b, t))
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if lengths is None:
            lengths = jnp.full((b,), t, jnp.int32) + (0 if cache_offset is None else cache_offset)
        rcfg = retrieval_cfg or RetrievalConfig()
        pcfg = prefill_cfg or PrefillConfig()
        inv_freq = rope_inv_freq(self.cfg)
        qk_layers = set(range(self.cfg.num_layers)) if return_qk is True else set(return_qk or ())

        x = self.embed(tokens)  # [B, T, D]
        new_k, new_v, new_codes, qk = [], [], [], {}
        for i, layer in enumerate(self.layers):
            cache_kv = None if cache is None else (cache.k[i], cache.v[i], cache.codes[i])
            hash_module = hashes.for_layer(i) if (hashes is not None and rcfg.is_sparse_layer(i)) else None
            x, layer_cache, layer_qk = layer(
                x, positions, inv_freq, lengths, cache_kv, rcfg, hash_module, cache_offset, pcfg
            )
            if layer_cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
                new_codes.append(layer_cache[2])
            if i in qk_layers:
                qk[i] = layer_qk
        x = self.norm(x)
        if logits == "last":
            x = jnp.take_along_axis(x, (lengths - 1 - positions[:, 0])[:, None, None].clip(0, t - 1), axis=1)
        elif logits != "all":
            raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
        if self.lm_head is None:
            out = jnp.einsum("btd,vd->btv", x, self.embed.embedding[...].astype(x.dtype))
        else:
            out = self.lm_head(x)
        new_cache = KVCache(tuple(new_k), tuple(new_v), tuple(new_codes)) if cache is not None else None
        return ModelOutput(out.astype(jnp.float32), new_cache, qk if qk_layers else None)
