"""Save / restore converted LLM parameters with orbax, so a model reloads without its original files.

Layout of a checkpoint folder:
    <path>/spotlight_model.json   ModelConfig + the dtypes it was saved with (small, human readable)
    <path>/params/                orbax `StandardCheckpointer` directory of the NNX parameter state
    <path>/tokenizer/             optional `tokenizer.save_pretrained` output (a GGUF tokenizer takes ~9 s to build)

Restoring builds the abstract model from the JSON (`nnx.eval_shape`, no allocation), then lets orbax fill it; that
skips GGUF dequantisation / safetensors conversion entirely.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spotlight_jax._io import atomic_dir
from spotlight_jax.config import ModelConfig
from spotlight_jax.model import CausalLM

CONFIG_FILE = "spotlight_model.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
FORMAT = "spotlight_jax.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, corrupt, or does not match the requested config."""


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a folder written by `save_model` (has its JSON config)."""
    return os.path.isfile(os.path.join(os.fspath(path), CONFIG_FILE))


def config_from_json(d: dict[str, Any]) -> ModelConfig:
    """The checkpoint's ModelConfig (JSON lists back to tuples), as a CheckpointError when it does not fit."""
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint config: {e}") from e


def save_model(model: CausalLM, path: str | os.PathLike, *, tokenizer: Any = None, overwrite: bool = False) -> str:
    """Write `model`'s parameters and config (and `tokenizer`, if given) under the folder `path`; returns it.

    The folder is written beside `path` and renamed into place, so `path` holds a whole checkpoint or none (also
    after a crash or a full disk). `overwrite=True` replaces an earlier `save_model` folder (or an empty one) and
    refuses any other folder, so that files of yours are never deleted.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    _, state = nnx.split(model)
    param_dtype = jax.tree.leaves(state)[0].dtype
    with atomic_dir(path, "a spotlight_jax model checkpoint", is_checkpoint) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, PARAMS_DIR), state)
        checkpointer.wait_until_finished()
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, TOKENIZER_DIR))
        meta = {
            "format": FORMAT,
            "model_config": model.cfg.to_dict(),
            "dtype": jnp.dtype(model.dtype).name,
            "param_dtype": jnp.dtype(param_dtype).name,
        }
        # Written last: a folder with the JSON has complete params (the rename makes that hold at `path` too).
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)
    return path


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved with a checkpoint, or None when it was saved without one."""
    folder = os.path.join(os.fspath(path), TOKENIZER_DIR)
    if not os.path.isdir(folder):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def load_config(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, raw metadata) of a checkpoint folder, with clear errors when it is not one."""
    path = os.fspath(path)
    meta_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path}: the folder does not exist (write one with save_model)")
    if not os.path.isfile(meta_path):
        raise CheckpointError(
            f"{path} is not a spotlight_jax model checkpoint: {CONFIG_FILE} is missing (an interrupted save, or a "
            "folder written by something else). Re-create it with spotlight_jax.checkpoint.save_model."
        )
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        cfg = config_from_json(meta["model_config"])
    except CheckpointError:
        raise
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path} is corrupt ({type(e).__name__}: {e}); re-save the checkpoint") from e
    return cfg, meta


def restore_model(
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    expected_config: ModelConfig | None = None,
) -> CausalLM:
    """Rebuild a `CausalLM` from a `save_model` folder, without the original weight files.

    dtype / param_dtype default to what was saved. `expected_config`, when given, must equal the saved one
    (ignoring `name`), else `CheckpointError` lists the differing fields.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    cfg, meta = load_config(path)
    if expected_config is not None:
        diff = [
            f"{f.name}: checkpoint {getattr(cfg, f.name)!r} vs expected {getattr(expected_config, f.name)!r}"
            for f in dataclasses.fields(ModelConfig)
            if f.name != "name" and getattr(cfg, f.name) != getattr(expected_config, f.name)
        ]
        if diff:
            raise CheckpointError(f"checkpoint {path} has a different model config:\n  " + "\n  ".join(diff))
    dtype = jnp.dtype(meta["dtype"]) if dtype is None else dtype
    saved_param_dtype = jnp.dtype(meta["param_dtype"])
    param_dtype = saved_param_dtype if param_dtype is None else param_dtype

    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, param_dtype=saved_param_dtype, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    params_path = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_path):
        raise CheckpointError(f"{path} has no {PARAMS_DIR}/ folder: the checkpoint is incomplete; re-save it")
    try:
        state = ocp.StandardCheckpointer().restore(params_path, abstract_state)
    except Exception as e:
        raise CheckpointError(
            f"could not restore parameters from {params_path}: the checkpoint is corrupt or does not match its "
            f"{CONFIG_FILE} ({type(e).__name__}: {str(e)[:500]}). Re-save it with save_model."
        ) from e
    model = nnx.merge(graphdef, state)
    if jnp.dtype(param_dtype) != saved_param_dtype:
        _, state = nnx.split(model)
        model = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(param_dtype), state))
    return model
