"""GGUF files (llama.cpp's format) -> HF config dict, HF-named lazy numpy tensors and a tokenizer; no torch.

Everything here reads the file with the standard library and numpy; only `gguf` (constants and `gguf.dequantize`),
`tokenizers` and the torch-free parts of `transformers` (`AutoConfig.for_model`, `PreTrainedTokenizerFast`) are used.
It reproduces what transformers' GGUF utilities (`modeling_gguf_pytorch_utils.load_gguf_checkpoint`, the GGUF
tokenizer builders) derive from a file, for the architectures `spotlight_jax` runs: llama (Llama 2/3/3.1, SmolLM,
Mistral converted as llama) and qwen2. Where llama.cpp's reading of a file differs from transformers', llama.cpp's
wins, because that is how the file was meant to be run:

  * `sliding_window` comes from `{arch}.attention.sliding_window` only (transformers falls back to MistralConfig's
    4096 for a file it calls "mistral"; llama.cpp runs such a file with full attention);
  * Llama-3 rope scaling is recovered from the `rope_freqs.weight` tensor llama.cpp stores it as (transformers
    drops it, and with it the long-context frequencies);
  * llama q/k/v biases, when a file has them, set `attention_bias` instead of being dropped.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count, the metadata
key/values, the tensor table (name, dims fastest-first, ggml type, offset into the data section), then the data
section, aligned to `general.alignment` (default 32). Tensors are memory-mapped and dequantised on demand.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import re
import struct
import warnings
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
_VERSIONS = (2, 3)  # v1 counted in 32 bits and has not been written since 2023


class GGUFError(ValueError):
    """A file that is not a readable GGUF: not one at all, truncated, corrupt, or of an unsupported kind."""


# ----------------------------------------------------------------------------------------------------------------------
# Parsing the header: metadata and tensor table.

# GGUF metadata value types -> struct format (fixed-size scalars), and numpy dtype for arrays of them.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPE = {k: np.dtype(v) for k, v in _SCALAR.items()}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in the file. `shape` is in numpy / torch order (ggml lists dims fastest first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF header. Metadata values: python scalars, `str`, numpy arrays (numeric arrays) or lists."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensorInfo, ...]

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)


class _Cursor:
    """Reads little-endian values off a buffer; running off its end raises `_Truncated` naming what was read."""

    def __init__(self, buf: Any, size: int):
        self.buf, self.size, self.pos, self.what = buf, size, 0, "the header"

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated(self.what, self.pos + n)

    def unpack(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n)
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.unpack("<Q")
        self.need(n)
        s = self.buf[self.pos : self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<IQ")
            if etype in _ARRAY_DTYPE:
                dtype = _ARRAY_DTYPE[etype]
                self.need(count * dtype.itemsize)
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos += count * dtype.itemsize
                return arr
            if etype == _STRING:
                return self._strings(count)
            return [self.value(etype) for _ in range(count)]
        raise GGUFError(f"unknown metadata value type {vtype}")

    def _strings(self, count: int) -> list[str]:
        # The vocabulary and the merges: ~50k strings each, so this loop is the hot part of reading a header.
        buf, pos, size, unpack, out = self.buf, self.pos, self.size, struct.unpack_from, []
        append = out.append
        for _ in range(count):
            if pos + 8 > size:
                raise _Truncated(self.what, pos + 8)
            (n,) = unpack("<Q", buf, pos)
            pos += 8
            if pos + n > size:
                raise _Truncated(self.what, pos + n)
            append(buf[pos : pos + n].decode("utf-8"))
            pos += n
        self.pos = pos
        return out


class _Truncated(Exception):
    def __init__(self, what: str, needed: int):
        super().__init__(what, needed)
        self.what, self.needed = what, needed


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor table (no tensor data is read). Raises `GGUFError` on a bad file."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < 24:
        raise GGUFError(f"{path} is not a GGUF file: only {size} bytes (truncated or empty)")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file: it starts with {bytes(buf[:4])!r}, not the magic b'GGUF'")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", buf, 4)
        if version not in _VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            kind = "a big-endian GGUF" if swapped in _VERSIONS else f"GGUF version {version}"
            raise GGUFError(f"{path} is {kind}; only little-endian GGUF v2/v3 files can be read")
        cur = _Cursor(buf, size)
        cur.pos = 24
        try:
            metadata: dict[str, Any] = {}
            for i in range(kv_count):
                cur.what = f"metadata entry {i + 1} of {kv_count}"
                key = cur.string()
                cur.what = f"metadata value {key!r}"
                metadata[key] = cur.value(cur.unpack("<I"))
            raw_tensors = []
            for i in range(tensor_count):
                cur.what = f"tensor table entry {i + 1} of {tensor_count}"
                name = cur.string()
                n_dims = cur.unpack("<I")
                if n_dims > 4:  # GGML_MAX_DIMS
                    raise GGUFError(f"tensor {name!r} claims {n_dims} dimensions")
                dims = cur.unpack(f"<{n_dims}Q") if n_dims else ()
                dims = (dims,) if isinstance(dims, int) else dims
                ggml_type, offset = cur.unpack("<IQ")
                raw_tensors.append((name, tuple(reversed(dims)), ggml_type, offset))
        except _Truncated as e:
            raise GGUFError(
                f"{path} is truncated or corrupt: reading {e.what} needs byte {e.needed:,}, but the file has "
                f"{size:,} bytes (an incomplete download?)"
            ) from None
        except (UnicodeDecodeError, struct.error, OverflowError, ValueError) as e:
            if isinstance(e, GGUFError):
                raise GGUFError(f"{path} is corrupt: bad {cur.what}: {e}") from None
            raise GGUFError(f"{path} is corrupt: bad {cur.what} ({type(e).__name__}: {e})") from None
        header_end = cur.pos

    if "general.architecture" not in metadata:
        raise GGUFError(f"{path} has no general.architecture in its metadata, so it is not a model GGUF")
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path} is corrupt: general.alignment is {alignment!r}, not a power of two")
    data_start = (header_end + alignment - 1) // alignment * alignment
    tensors = []
    for name, shape, ggml_type, offset in raw_tensors:
        try:
            qtype = gguf.GGMLQuantizationType(ggml_type)
        except ValueError:
            raise GGUFError(f"{path}: tensor {name} has unknown ggml type {ggml_type}") from None
        block_elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        elements = math.prod(shape)
        if shape and shape[-1] % block_elements:
            raise GGUFError(f"{path}: tensor {name} {shape} has rows not a multiple of {qtype.name} blocks")
        start, nbytes = data_start + offset, elements // block_elements * block_bytes
        if start + nbytes > size:
            raise GGUFError(
                f"{path} is truncated: tensor {name} ends at byte {start + nbytes:,}, but the file has {size:,} bytes "
                "(an incomplete download?)"
            )
        tensors.append(GGUFTensorInfo(name, shape, int(qtype), start, nbytes))
    return GGUFFile(path, version, metadata, tuple(tensors))


# ----------------------------------------------------------------------------------------------------------------------
# Config: GGUF metadata -> HF config dict (what `AutoConfig.for_model(**d)` takes).


def _scalar(value: Any, key: str, path: str) -> Any:
    if isinstance(value, np.ndarray):  # per-layer values (e.g. head_count_kv): fine when all layers agree
        if value.size and (value == value.flat[0]).all():
            return value.flat[0].item()
        raise GGUFError(f"{path}: {key} differs between layers ({value.tolist()}); this model is not supported")
    return value


def model_type_of(f: GGUFFile) -> str:
    """The HF model_type; transformers' rule: a llama file whose general.name is exactly "mistral" is Mistral."""
    arch = f.architecture
    model_type = "mistral" if arch == "llama" and f.metadata.get("general.name") == "mistral" else arch
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported model_type {arch!r} in GGUF {f.path}: spotlight_jax supports llama, mistral, qwen2 "
            "(Llama 2/3/3.1, Mistral, Qwen2/2.5)."
        )
    return model_type


def hf_config_dict(f: GGUFFile, rope_freqs: np.ndarray | None = None) -> dict[str, Any]:
    """The transformers config dict of a GGUF, as `load_gguf_checkpoint` derives it (same keys and values), plus
    `sliding_window`, Llama-3 `rope_scaling` and llama `attention_bias` as llama.cpp reads them (module docstring).

    `rope_freqs`: the file's `rope_freqs.weight` values, when it has that tensor (read by `gguf_model`).
    """
    md, arch, model_type = f.metadata, f.architecture, model_type_of(f)

    def get(key: str, default: Any = None) -> Any:
        full = f"{arch}.{key}"
        return _scalar(md[full], full, f.path) if full in md else default

    required = {
        "num_hidden_layers": "block_count",
        "hidden_size": "embedding_length",
        "intermediate_size": "feed_forward_length",
        "num_attention_heads": "attention.head_count",
    }
    missing = [f"{arch}.{k}" for k in required.values() if f"{arch}.{k}" not in md]
    if missing:
        raise GGUFError(f"{f.path}: metadata lacks {', '.join(missing)}, which the model shape needs")
    config: dict[str, Any] = {"model_type": model_type}
    config.update({hf: get(key) for hf, key in required.items()})
    optional = {
        "max_position_embeddings": "context_length",
        "num_key_value_heads": "attention.head_count_kv",
        "rope_theta": "rope.freq_base",
        "rms_norm_eps": "attention.layer_norm_rms_epsilon",
        "vocab_size": "vocab_size",
    }
    config.update({hf: get(key) for hf, key in optional.items() if get(key) is not None})
    if "general.name" in md:
        config["_model_name_or_path"] = md["general.name"]
    # head_dim: the key width where stated; for llama transformers reads the rotary width (equal in these models).
    head_dim = get("attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = get("rope.dimension_count")
    if head_dim is not None:
        config["head_dim"] = head_dim
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in md:
        config["vocab_size"] = len(md["tokenizer.ggml.tokens"])
    names = set(f.tensor_names)
    config["tie_word_embeddings"] = "output.weight" not in names  # llama.cpp writes it only when untied
    for hf, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        if f"tokenizer.ggml.{key}_token_id" in md:
            config[f"{hf}_token_id"] = md[f"tokenizer.ggml.{key}_token_id"]
    # llama.cpp applies a window only when the file states one.
    window = get("attention.sliding_window")
    config["sliding_window"] = int(window) if window else None
    if model_type == "qwen2":
        config["use_sliding_window"] = bool(window)
    if arch == "llama" and any(re.fullmatch(r"blk\.\d+\.attn_[qkv]\.bias", n) for n in names):
        config["attention_bias"] = True
    scaling = _rope_scaling(f, get, config, rope_freqs)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _rope_scaling(f: GGUFFile, get: Callable, config: dict, rope_freqs: np.ndarray | None) -> dict | None:
    kind = get("rope.scaling.type")
    if kind not in (None, "none"):
        # linear / yarn / longrope: passed on so that ModelConfig refuses them by name rather than ignoring them.
        scaling = {"rope_type": kind, "factor": get("rope.scaling.factor")}
        if get("rope.scaling.original_context_length") is not None:
            scaling["original_max_position_embeddings"] = get("rope.scaling.original_context_length")
        return scaling
    if rope_freqs is None:
        return None
    return llama3_rope_scaling_from_factors(
        np.asarray(rope_freqs, np.float64),
        head_dim=int(get("rope.dimension_count") or config.get("head_dim") or 0)
        or config["hidden_size"] // config["num_attention_heads"],
        theta=float(config.get("rope_theta", 10000.0)),
        path=f.path,
    )


def _llama3_factors(inv_freq: np.ndarray, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """llama.cpp's `rope_freqs` (the divisor of each inverse frequency) for HF's llama3 rope scaling."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    out = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen > original / low, factor, out)
    return np.where(wavelen < original / high, 1.0, out)


def llama3_rope_scaling_from_factors(
    factors: np.ndarray, *, head_dim: int, theta: float, path: str = ""
) -> dict | None:
    """HF's `rope_scaling` (rope_type llama3) that reproduces llama.cpp's `rope_freqs.weight` exactly.

    llama.cpp stores Llama-3 scaling only as these per-frequency divisors. `factor` is their maximum; with Llama 3.x's
    low/high frequency factors (1, 4) each divisor in the smooth band fixes `original_max_position_embeddings`. The
    result is checked by recomputing every divisor, so a file scaled some other way is refused rather than misread.
    """
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv_freq.shape:
        raise GGUFError(f"{path}: rope_freqs.weight has {factors.size} values, expected head_dim/2 = {inv_freq.size}")
    if np.allclose(factors, 1.0):
        return None
    factor, low, high = float(np.float32(factors.max())), 1.0, 4.0
    wavelen = 2 * math.pi / inv_freq
    band = (factors > 1.0 + 1e-6) & (factors < factor * (1 - 1e-6))
    candidates = []
    if band.any():  # 1/f = (1 - s)/factor + s, s = (original/wavelen - low)/(high - low)
        s = (1.0 / factors[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
        candidates.append(round(float(np.median(wavelen[band] * (low + s * (high - low))))))
    candidates += [2**k for k in range(8, 21)]
    for original in candidates:
        if np.allclose(_llama3_factors(inv_freq, factor, low, high, original), factors, rtol=1e-5, atol=1e-6):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": int(original),
            }
    raise GGUFError(
        f"{path}: rope_freqs.weight is not Llama-3 rope scaling with low/high frequency factors 1/4; "
        "this rope scaling is not supported"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Tensors: GGUF names -> HF names, lazily dequantised, llama's q/k row permutation undone.

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF name of a llama / mistral / qwen2 GGUF tensor (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj
    .weight`), or None for tensors with no HF counterpart (`rope_freqs.weight`, ...)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m[2] in _BLOCK_NAMES:
        return f"model.layers.{m[1]}.{_BLOCK_NAMES[m[2]]}.{m[3]}"
    return None


def unpermute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k rows (its rotary pairs (i, i + H/2) are stored interleaved (2i, 2i+1)).

    Same as transformers' `LlamaTensorProcessor._reverse_permute_weights`; `n_head` is the number of heads of this
    projection (num_attention_heads for q, num_key_value_heads for k). Works for weights and biases.
    """
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def _q8_0(blocks: np.ndarray, out: np.ndarray) -> None:  # f16 scale d, 32 x int8 q: d * q
    np.multiply(blocks[:, 2:].view(np.int8), blocks[:, :2].copy().view(np.float16).astype(np.float32), out=out)


def _q4_0(blocks: np.ndarray, out: np.ndarray) -> None:  # f16 d, 16 bytes of nibbles (low: 0..15, high: 16..31)
    qs = blocks[:, 2:]
    np.bitwise_and(qs, 0x0F, out=out[:, :16], casting="unsafe")
    np.right_shift(qs, 4, out=out[:, 16:], casting="unsafe")
    out -= 8.0
    out *= blocks[:, :2].copy().view(np.float16).astype(np.float32)


def _q4_1(blocks: np.ndarray, out: np.ndarray) -> None:  # f16 d, f16 min m, 16 bytes of nibbles: d * q + m
    qs = blocks[:, 4:]
    np.bitwise_and(qs, 0x0F, out=out[:, :16], casting="unsafe")
    np.right_shift(qs, 4, out=out[:, 16:], casting="unsafe")
    out *= blocks[:, :2].copy().view(np.float16).astype(np.float32)
    out += blocks[:, 2:4].copy().view(np.float16).astype(np.float32)


# Whole-tensor numpy versions of the commonest legacy block types: the same float32 operations in the same order as
# `gguf.dequantize`, so bit-identical (tested), but ~2.5x faster (gguf loops over groups of 16 rows). Others go to gguf.
_Q = gguf.GGMLQuantizationType
_FAST_DEQUANT = {_Q.Q8_0: _q8_0, _Q.Q4_0: _q4_0, _Q.Q4_1: _q4_1}
_CHUNK_BLOCKS = 1 << 15  # blocks per step: keeps the temporaries in cache


def dequantize(blob: np.ndarray, info: GGUFTensorInfo, path: str = "") -> np.ndarray:
    """A tensor's values as float32 numpy (exactly as `gguf.dequantize` gives them), in `info.shape`."""
    qtype = gguf.GGMLQuantizationType(info.ggml_type)
    raw = blob[info.offset : info.offset + info.nbytes]
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.array(raw.view(np.float32).reshape(info.shape))  # a copy: never hand out the read-only map
    block_elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if qtype in _FAST_DEQUANT:
        blocks = raw.reshape(-1, block_bytes)
        out = np.empty((blocks.shape[0], block_elements), np.float32)
        for i in range(0, blocks.shape[0], _CHUNK_BLOCKS):
            _FAST_DEQUANT[qtype](blocks[i : i + _CHUNK_BLOCKS], out[i : i + _CHUNK_BLOCKS])
        return out.reshape(info.shape)
    rows = raw.reshape(-1, (info.shape[-1] // block_elements * block_bytes) if info.shape else block_bytes)
    try:
        return gguf.dequantize(rows, qtype).reshape(info.shape)
    except NotImplementedError:
        raise GGUFError(f"{path}: tensor {info.name} is {qtype.name}, which gguf cannot dequantise") from None


def tensor_loaders(f: GGUFFile, config: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], Callable]]:
    """`{hf_name: (shape, load)}`; `load()` dequantises one tensor from a memory map of the file (float32 numpy).

    GGUF tensors with no HF name are keyed `<gguf>name` (so `convert_tensors` can ignore or report them). For the
    llama architecture (which includes Mistral), q/k rows are un-permuted as transformers' `LlamaTensorProcessor`
    does; qwen2 files are stored unpermuted.
    """
    blob = np.memmap(f.path, mode="r", dtype=np.uint8)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config.get("num_key_value_heads")}
    heads["attn_k"] = heads["attn_k"] or heads["attn_q"]
    out: dict[str, tuple[tuple[int, ...], Callable]] = {}
    for info in f.tensors:
        hf = hf_tensor_name(info.name)
        m = _BLOCK_RE.fullmatch(info.name)
        n_head = heads.get(m[2]) if (m and f.architecture == "llama") else None

        def load(info=info, n_head=n_head) -> np.ndarray:
            w = dequantize(blob, info, f.path)
            return unpermute_qk(w, n_head) if n_head else w

        key = hf if hf is not None else f"<gguf>{info.name}"
        if key in out:
            raise GGUFError(f"{f.path}: two tensors map to {key}")
        out[key] = (info.shape, load)
    return out


def gguf_model(path: str | os.PathLike) -> tuple[GGUFFile, dict[str, Any], dict[str, tuple[tuple[int, ...], Callable]]]:
    """`(parsed file, HF config dict, {hf_name: (shape, load)})` of a GGUF model file."""
    f = read_gguf(path)
    rope = next((t for t in f.tensors if t.name == "rope_freqs.weight"), None)
    rope_freqs = None
    if rope is not None:
        rope_freqs = dequantize(np.memmap(f.path, mode="r", dtype=np.uint8), rope, f.path)
    config = hf_config_dict(f, rope_freqs)
    return f, config, tensor_loaders(f, config)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer: tokenizer.ggml.* metadata -> `tokenizers.Tokenizer` -> `transformers.PreTrainedTokenizerFast`.

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte)

# Pre-tokenizer splits by `tokenizer.ggml.pre`, as transformers' GGUF tokenizer builder picks them; the regexes are
# the ones of the original `tokenizer.json`s (llama.cpp's `llama-vocab.cpp` uses the same).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = dict.fromkeys(
    ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe", "lfm2", "midm-2.0"), _LLAMA3_SPLIT
) | dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT)
# GPT-2's regex after isolating every digit (llama.cpp's STARCODER group; SmolLM's tokenizer.json does the same).
_DIGIT_SPLIT_PRES = ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva-7b")
_GPT2_PRES = (None, "default", "gpt2", "gpt-2")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE spells every token in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _byte_level_backend(tokens: list[str], merges: list[tuple[str, str]], pre: str | None) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, t in enumerate(tokens):
        vocab[t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))] = i
    bpe = BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="")
    tok = Tokenizer(bpe)  # fuse_unk=False, byte_fallback=False: the defaults
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _DIGIT_SPLIT_PRES:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        if pre not in _GPT2_PRES:
            warnings.warn(
                f"GGUF pre-tokenizer {pre!r} is not known to spotlight_jax; splitting with GPT-2's regex, as "
                "transformers does. Tokens may differ from llama.cpp's on some text.",
                stacklevel=4,
            )
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return tok


def _generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary and its scores (transformers' `generate_merges`)."""
    merges = []
    for piece, score in scores.items():
        splits = ((piece[:i], piece[i:]) for i in range(1, len(piece)))
        local = [(left, right, score) for left, right in splits if left in vocab and right in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _sentencepiece_backend(tokens: list[str], merges: list[tuple[str, str]] | None, md: dict) -> Any:
    """Llama / Mistral sentencepiece BPE with byte fallback (transformers' `LlamaTokenizer` backend)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is None:
        scores = md.get("tokenizer.ggml.scores")
        if scores is None:
            raise GGUFError("a sentencepiece ('llama') GGUF vocabulary needs tokenizer.ggml.scores or .merges")
        merges = _generate_merges(vocab, dict(zip(tokens, scores.tolist(), strict=True)))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = None
    # transformers ignores tokenizer.ggml.add_space_prefix (always prepends); so does this, to encode the same.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    return tok


def build_tokenizer(f: GGUFFile) -> Any:
    """The file's tokenizer as a `transformers.PreTrainedTokenizerFast` (no torch), equal to what
    `AutoTokenizer.from_pretrained(folder, gguf_file=...)` builds: vocabulary, merges, pre-tokenizer, control
    tokens as special tokens, bos/eos/unk/pad, add_bos/add_eos and the chat template.

    Supports `tokenizer.ggml.model` "gpt2" (byte-level BPE: SmolLM, Qwen2, Llama 3) and "llama" (sentencepiece BPE:
    Llama 2, Mistral); anything else is a `GGUFError` naming it.
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    md = f.metadata
    model = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise GGUFError(f"{f.path} has no tokenizer (tokenizer.ggml.model / .tokens); load it with tokenizer=False")
    merges = md.get("tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in merges] if merges is not None else None
    if model == "gpt2":
        backend = _byte_level_backend(tokens, merges or [], md.get("tokenizer.ggml.pre"))
        spelled = set(_bytes_to_unicode().values())
    elif model == "llama":
        backend = _sentencepiece_backend(tokens, merges, md)
        spelled = None
    else:
        raise GGUFError(
            f"{f.path}: GGUF tokenizer model {model!r} is not supported (supported: 'gpt2' byte-level BPE, "
            "'llama' sentencepiece); load with tokenizer=False and supply a tokenizer"
        )
    types = md.get("tokenizer.ggml.token_type")
    if types is not None:
        types = np.asarray(types)
        # Control tokens stay whole as special tokens; a control token spelled outside the byte alphabet of a
        # byte-level vocabulary is a llama.cpp mislabel, skipped (as transformers does).
        control = [
            AddedToken(tokens[i], normalized=False, special=True)
            for i in np.flatnonzero(types == _CONTROL)
            if spelled is None or set(tokens[i]) <= spelled
        ]
        if control:
            backend.add_special_tokens(control)
        vocab = backend.get_vocab()
        user = [
            AddedToken(tokens[i], normalized=False, special=False)
            for i in np.flatnonzero(types == _USER_DEFINED)
            if tokens[i] in vocab
        ]
        if user:
            backend.add_tokens(user)

    def token(key: str) -> str | None:
        i = md.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    kwargs: dict[str, Any] = {
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
        "add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token", model == "llama")),
        "add_eos_token": bool(md.get("tokenizer.ggml.add_eos_token", False)),
    }
    if "tokenizer.chat_template" in md:
        kwargs["chat_template"] = md["tokenizer.chat_template"]
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
