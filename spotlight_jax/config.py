"""Frozen configuration dataclasses: the model architecture and the decode-time retrieval settings.

Both are hashable so they can be static arguments of `jax.jit`; make variants with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Any

from spotlight_jax._io import read_json


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


# HF `model_type`s that map onto our CausalLM (Llama-style decoder: RoPE, RMSNorm, SwiGLU).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama / Qwen2 / Mistral style decoder."""

    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int
    num_layers: int
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rope_theta: float = 10000.0
    # Llama-3 style rope scaling as a sorted tuple of (key, value) pairs (hashable); None = plain RoPE.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    max_position_embeddings: int = 8192
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""
    sliding_window: int | None = None  # Mistral-style local attention: keys more than this far back are masked

    def __post_init__(self):
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")
        values = {k: getattr(self, k) for k in (*sizes, "head_dim")}
        bad = {k: v for k, v in values.items() if not _is_int(v) or v < 1}
        if bad:
            raise ValueError(f"model sizes must be integers >= 1, got {bad}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}: spotlight_jax supports {SUPPORTED_MODEL_TYPES} "
                "(Llama 2/3/3.1, Mistral, Qwen2/2.5). Other architectures need their own key table in "
                "spotlight_jax/convert.py."
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def group_size(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples become lists in JSON; `from_dict` turns them back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict` (after a JSON round trip). Unknown fields are a ValueError naming them."""
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"config has fields this version of ModelConfig does not know: {unknown}")
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = tuple(tuple(kv) for kv in d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)

    @classmethod
    def from_hf(cls, hf_config: Any, name: str = "") -> ModelConfig:
        """Build from a transformers `PretrainedConfig`, a config dict, or a path to `config.json` / its folder."""
        if isinstance(hf_config, str | os.PathLike):
            path = os.fspath(hf_config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"no config.json at {path}: a model folder needs config.json + *.safetensors")
            hf_config = read_json(path, ValueError, f"no config.json at {path}")
            try:
                return cls._from_hf_dict(hf_config, name)
            except KeyError as e:
                raise ValueError(f"{path} lacks {e}, which the model shape needs: is it a model's config.json?") from e
            except (TypeError, ZeroDivisionError) as e:
                raise ValueError(f"{path} holds a value of the wrong type or size ({e}); fix or re-download it") from e
        if not isinstance(hf_config, dict) and not hasattr(hf_config, "to_dict"):
            raise TypeError(f"from_hf takes a transformers config, a dict or a path, got {type(hf_config).__name__}")
        return cls._from_hf_dict(hf_config if isinstance(hf_config, dict) else hf_config.to_dict(), name)

    @classmethod
    def _from_hf_dict(cls, cfg: dict[str, Any], name: str) -> ModelConfig:
        model_type = cfg.get("model_type", "<missing>")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}: spotlight_jax supports {SUPPORTED_MODEL_TYPES} "
                "(Llama 2/3/3.1, Mistral, Qwen2/2.5)."
            )
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        rope_scaling = cfg.get("rope_scaling") or None
        # transformers v5 folds rope settings into `rope_parameters`.
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        if rope_scaling is None and rope_params.get("rope_type", "default") not in ("default", None):
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rope_type in (None, "default"):
                rope_scaling = None
            elif rope_type != "llama3":
                raise ValueError(f"unsupported rope_scaling type {rope_type!r}: only 'llama3' scaling is implemented")
            else:
                rope_scaling = tuple(sorted((k, v) for k, v in rope_scaling.items() if not isinstance(v, list)))
        window = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None  # Qwen2 configs carry a window size but only use it when use_sliding_window is set
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list | tuple) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
            model_type=model_type,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=name or cfg.get("_name_or_path", ""),
            sliding_window=int(window) if window else None,
        )

    # Presets of real shapes: speed work uses them with random weights (values do not change speed).
    @classmethod
    def smollm2_135m(cls) -> ModelConfig:
        return cls(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
            head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
            max_position_embeddings=8192, bos_token_id=1, eos_token_ids=(2,), name="SmolLM2-135M-Instruct",
        )  # fmt: skip

    @classmethod
    def qwen2_5_7b(cls) -> ModelConfig:
        return cls(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
            head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6, attention_bias=True, model_type="qwen2",
            max_position_embeddings=131072, eos_token_ids=(151645,), name="Qwen2.5-7B",
        )  # fmt: skip

    @classmethod
    def llama3_8b(cls) -> ModelConfig:
        return cls(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
            head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
            rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                          ("original_max_position_embeddings", 8192), ("rope_type", "llama3")),
            bos_token_id=128000, eos_token_ids=(128001, 128009), name="Llama-3.1-8B",
        )  # fmt: skip

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        presets = {"smollm2-135m": cls.smollm2_135m, "qwen2.5-7b": cls.qwen2_5_7b, "llama3-8b": cls.llama3_8b}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]()


METHODS = ("dense", "oracle", "linear", "spotlight", "quest")


# Method modifiers that pick how the Hamming top-k is launched (RetrievalConfig.topk_one_launch).
LAUNCH_MODIFIERS = {"1launch": True, "3launch": False}


def _fraction_modifier(mod: str, prefix: str, top: float, what: str, example: str) -> float:
    """'+keep5' -> 0.05, '+mass0.9' -> 0.9: the number after `prefix`, in (0, top], as a fraction of `top`."""
    try:
        value = float(mod[len(prefix) :])
    except ValueError:
        value = -1.0
    if not 0 < value <= top:
        raise ValueError(f"method modifier {mod!r}: {what} in (0, {top}], e.g. {example}")
    return value / top


def split_method(spec: str) -> tuple[str, dict[str, int | float | bool]]:
    """'spotlight+sink4+recent16' -> ('spotlight', {'sink_tokens': 4, 'recent_window': 16}).

    Modifiers after '+' (RetrievalConfig fields of a sparse method):
    - '+sink<N>' / '+recent<N>' always keep the first / last N rows;
    - '+rerank<R>' rescores R * k Hamming candidates exactly and keeps the best k (two-stage selection, linear /
      spotlight);
    - '+mass<P>' keeps, within the budget, the fewest rows whose estimated attention mass reaches P (adaptive
      budget: oracle, or with +rerank<R>);
    - '+keep<P>' keeps P % of the rows (keep_ratio = P / 100, e.g. '+keep5', '+keep2.5');
    - '+1launch' / '+3launch' run the Hamming top-k as one kernel launch or one per pass (topk_one_launch);
    - '+prologue' / '+noprologue' run each decode step's RoPE, hashing and cache writes as one kernel or as the
      unfused XLA ops (fused_prologue, on by default; also for dense).
    """
    name, *mods = spec.split("+")
    fields: dict[str, int | float | bool] = {}
    for mod in mods:
        if mod in ("prologue", "noprologue"):
            fields["fused_prologue"] = mod == "prologue"
            continue
        if mod in LAUNCH_MODIFIERS:
            fields["topk_one_launch"] = LAUNCH_MODIFIERS[mod]
            continue
        if mod.startswith("keep"):
            fields["keep_ratio"] = _fraction_modifier(mod, "keep", 100, "+keep<P> takes a percentage", "+keep5")
            continue
        if mod.startswith("mass"):
            fields["top_p"] = _fraction_modifier(mod, "mass", 1, "+mass<P> takes an attention mass", "+mass0.9")
            continue
        for field, prefix in (("sink_tokens", "sink"), ("recent_window", "recent"), ("rerank", "rerank")):
            if mod.startswith(prefix) and mod[len(prefix) :].isdigit():
                fields[field] = int(mod[len(prefix) :])
                break
        else:
            raise ValueError(
                f"unknown method modifier {mod!r}: use +sink<N>, +recent<N> (e.g. spotlight+sink4), +rerank<R>, "
                "+mass<P>, +keep<P>, +1launch, +3launch, +prologue, +noprologue"
            )
    if set(fields) - {"fused_prologue"} and name == "dense":
        raise ValueError("dense reads every row: method modifiers (+sink<N>, +keep<P>, ...) apply to sparse methods")
    return name, fields


def keep_budget(n, keep_ratio: float, min_keep: int, slack: float = 0.0):
    """The budget rule: of `n` rows keep max(min_keep, ceil(keep_ratio * n)); callers cap it (by the buffer or n).

    `n` a Python int -> int (float64 arithmetic: static buffer sizes); a jax array -> int32 array (float32
    arithmetic, traceable). `slack` is taken off before the ceil so that a product a rounding error above an integer
    (0.07 * 100 -> 7.000000000000001) rounds as exact arithmetic would.
    """
    if isinstance(n, numbers.Integral):
        return max(min_keep, math.ceil(keep_ratio * n - slack))
    import jax.numpy as jnp  # here, so that the config module itself imports no jax

    x = keep_ratio * jnp.asarray(n).astype(jnp.float32)
    if slack:
        x = x - slack
    return jnp.maximum(min_keep, jnp.ceil(x).astype(jnp.int32))


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    """How decode-step attention picks the KV rows it reads (static under jit).

    `method="dense"` reads everything. The other methods keep, per (batch row, KV head), the top
    `keep_budget(length, keep_ratio, min_keep) = max(min_keep, ceil(keep_ratio * length))` tokens by their method's
    score; the selection buffer has the static size `k_max(max_len)`. Layers in `dense_layers` always attend densely.
    """

    method: str = "dense"
    keep_ratio: float = 0.02
    min_keep: int = 20
    dense_layers: tuple[int, ...] = (0, 1)
    sink_tokens: int = 0  # always-kept first tokens
    recent_window: int = 0  # always-kept last tokens
    bits: int = 128  # code length for `linear` / `spotlight`
    quest_page_size: int = 16
    implementation: str | None = None  # "xla" | "pallas" | None (= pallas on GPU, xla elsewhere)
    # Pallas Hamming top-k in one kernel launch (True) or one launch per pass (False); None = the kernel's default
    # (pallas_kernels.hamming_topk.ONE_LAUNCH: one launch for large grids).
    topk_one_launch: bool | None = None
    # Decode steps run RoPE, the hash MLPs, pack_bits and the K / V / code-cache writes of a layer in one kernel
    # (pallas_kernels.decode_prologue) instead of ~15 small XLA kernels (H100, B5 128K: spotlight step 8.03 ->
    # 7.84 ms, dense unchanged). On the XLA path it runs the same ops unfused. False: the model's unfused ops.
    fused_prologue: bool = True
    # Two-stage selection: the Hamming top-k keeps rerank * k candidates, whose exact q.k scores (group-summed
    # attention, as the oracle ranks) pick the final k (retrieval.rerank). 1 = off (one stage).
    rerank: int = 1
    # Adaptive budget (in the spirit of Twilight's top-p): of the budget's rows ranked by exact attention, keep the
    # fewest whose attention mass reaches top_p, and at least min_keep; the budget becomes a cap. The mass is
    # measured where exact scores exist: over every row (oracle) or over the rerank candidates. 1.0 = off.
    top_p: float = 1.0
    # Tensor parallelism: a jax Mesh with axis "tp" (spotlight_jax.parallel.tp_mesh); the decode step's attention
    # then runs per device on its KV heads. None = one device.
    mesh: Any = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown retrieval method {self.method!r}; choose one of {METHODS}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if not _is_int(self.min_keep) or self.min_keep < 1:
            raise ValueError(f"min_keep must be an integer >= 1, got {self.min_keep!r}")
        if not _is_int(self.bits) or self.bits < 32 or self.bits % 32:
            raise ValueError(f"bits must be a positive multiple of 32 (e.g. 128), got {self.bits!r}")
        for name in ("sink_tokens", "recent_window"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not _is_int(self.rerank) or self.rerank < 1:
            raise ValueError(f"rerank must be an integer >= 1 (1 = one-stage selection), got {self.rerank!r}")
        if self.rerank > 1 and self.method not in ("linear", "spotlight"):
            raise ValueError(
                f"rerank rescores Hamming candidates: it applies to linear / spotlight, not {self.method!r}"
            )
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, numbers.Real) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p (attention mass to keep) must be in (0, 1], got {self.top_p!r}")
        if self.top_p < 1.0 and not (self.method == "oracle" or self.rerank > 1):
            raise ValueError(
                "top_p needs exact scores: use it with method 'oracle' or with rerank > 1 "
                "(e.g. spotlight+rerank4+mass0.9)"
            )
        if not _is_int(self.quest_page_size) or self.quest_page_size < 1:
            raise ValueError(f"quest_page_size must be an integer >= 1, got {self.quest_page_size!r}")
        if isinstance(self.dense_layers, list):  # a list would make the config unhashable (a static jit argument)
            object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        if not isinstance(self.dense_layers, tuple) or not all(_is_int(i) and i >= 0 for i in self.dense_layers):
            raise ValueError(f"dense_layers must be a tuple of layer indices >= 0, got {self.dense_layers!r}")
        if self.mesh is not None and "tp" not in getattr(self.mesh, "axis_names", ()):
            raise ValueError(f"mesh must have an axis named 'tp' (spotlight_jax.parallel.tp_mesh), got {self.mesh!r}")
        if self.fused_prologue not in (True, False):
            raise ValueError(f"fused_prologue must be True or False, got {self.fused_prologue!r}")
        if self.topk_one_launch not in (None, True, False):
            raise ValueError(f"topk_one_launch must be True, False or None, got {self.topk_one_launch!r}")
        if self.implementation not in (None, "xla", "pallas"):
            raise ValueError(f"implementation must be 'xla', 'pallas' or None, got {self.implementation!r}")

    def check_layers(self, num_layers: int) -> None:
        """Refuse dense_layers naming a layer the model does not have (a typo would silently keep no layer dense)."""
        bad = [i for i in self.dense_layers if i >= num_layers]
        if bad:
            raise ValueError(
                f"dense_layers {list(self.dense_layers)} name layer(s) {bad}, but the model has layers "
                f"0..{num_layers - 1}: fix dense_layers"
            )

    def k_max(self, max_len: int) -> int:
        """Static size of the selection buffer for a cache of `max_len` tokens."""
        return min(max_len, keep_budget(max_len, self.keep_ratio, self.min_keep))

    def is_sparse_layer(self, layer: int) -> bool:
        return self.method != "dense" and layer not in self.dense_layers


PREFILL_ATTENTION = ("pallas", "cudnn", "xla")
# Tokens per prefill chunk summed over the batch, by backend: the chunk's GEMMs are [B * chunk, D] x [D, F], large
# enough at 8K rows to run near the GPU's GEMM rate, while the activations a chunk holds (B * chunk * F) stay small
# beside the weights and caches. The CPU's GEMMs saturate far earlier, and a smaller chunk keeps its memory low.
PREFILL_CHUNK_TOKENS = {"gpu": 8192, "cpu": 1024}
MIN_PREFILL_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """How a prompt is prefilled (static under jit): in chunks of `chunk` tokens, each writing its keys, values and
    key codes into the preallocated cache and attending causally to the cache so far.

    `chunk` None picks `default_chunk(batch, backend)`. `attention` picks the chunk attention kernel: "pallas" (ours,
    `pallas_kernels.flash_attention`), "cudnn" (`jax.nn.dot_product_attention`, GPU only) or "xla" (the blocked XLA
    loop); None follows `RetrievalConfig.implementation` (pallas on a GPU, xla elsewhere).
    """

    chunk: int | None = None
    attention: str | None = None

    def __post_init__(self):
        if self.chunk is not None and (not isinstance(self.chunk, int) or isinstance(self.chunk, bool)):
            raise ValueError(f"prefill chunk must be an integer number of tokens, got {self.chunk!r}")
        if self.chunk is not None and self.chunk < 1:
            raise ValueError(f"prefill chunk must be >= 1 token, got {self.chunk}")
        if self.attention not in (None, *PREFILL_ATTENTION):
            raise ValueError(f"prefill attention must be one of {PREFILL_ATTENTION} or None, got {self.attention!r}")

    def attention_impl(self, retrieval_cfg: RetrievalConfig) -> str | None:
        if self.attention is None and retrieval_cfg.mesh is not None:
            # Under tensor parallelism the prefill runs on XLA's SPMD partitioner, which splits the blocked XLA loop
            # by heads but cannot split a Pallas call.
            return "xla"
        return self.attention or retrieval_cfg.implementation

    def chunk_for(self, batch: int, prompt_bucket: int, cache_len: int, backend: str) -> int:
        """The chunk a prefill of `batch` prompts (right-padded to `prompt_bucket`) into a cache of `cache_len` uses:
        the set one, checked against the cache, or the default, never longer than the prompt bucket or the cache."""
        if self.chunk is not None:
            if self.chunk > cache_len:
                raise ValueError(
                    f"prefill chunk of {self.chunk} tokens is longer than the cache ({cache_len} tokens): "
                    f"use a chunk <= {cache_len} or a larger max_len"
                )
            return self.chunk
        return min(default_chunk(batch, backend), prompt_bucket, cache_len)


def default_chunk(batch: int, backend: str) -> int:
    """Power-of-two chunk whose batch * chunk is about `PREFILL_CHUNK_TOKENS[backend]` (at least MIN_PREFILL_CHUNK)."""
    budget = PREFILL_CHUNK_TOKENS["cpu" if backend == "cpu" else "gpu"]
    per_row = max(MIN_PREFILL_CHUNK, budget // max(1, batch))
    return 1 << (per_row.bit_length() - 1)
