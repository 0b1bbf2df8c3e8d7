"""The README's Quick start runs as written and prints what it generates, and the README stays a short page.

The Quick start loads the hashes `make main` writes. Here an untrained hash stack is exported at the same relative
path inside a temporary working folder (the block only has to run as written, not to retrieve well), and the block
runs there in a fresh interpreter, exactly as a user pastes it.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 160


def quick_start_code() -> str:
    """The first ```python block after the "## Quick start" heading."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Quick start\n.*?^```python\n(.*?)^```", text, re.S | re.M)
    assert match, "README.md has no ```python block under '## Quick start'"
    return match.group(1)


def default_hashes_path() -> str:
    """Where `make main` (`python -m spotlight_jax.train` with its defaults) exports the hashes, relative to the cwd."""
    from spotlight_jax.train import TrainConfig

    return TrainConfig().export_path


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"


def test_quick_start_loads_what_make_main_writes():
    code = quick_start_code()
    assert f'load_hashes("{default_hashes_path()}"' in code, "the Quick start should load make main's hashes"
    assert "tp_mesh" not in code, "the Quick start must run on one device: multi-GPU goes in its own block"


@pytest.mark.real_model
@pytest.mark.slow
def test_quick_start_runs_as_written(smollm2_path, tmp_path):
    from flax import nnx

    from spotlight_jax.config import ModelConfig
    from spotlight_jax.hashing import HashConfig, HashStack, export_hashes

    stack = HashStack(ModelConfig.smollm2_135m(), HashConfig(), rngs=nnx.Rngs(0))
    export_hashes(tmp_path / default_hashes_path(), stack)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    run = subprocess.run(
        [sys.executable, "-c", quick_start_code()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, f"the Quick start failed:\n{run.stderr[-4000:]}"

    printed = {}
    for line in run.stdout.splitlines():
        label, sep, text = line.partition(":")
        if sep:
            printed[label.strip()] = text.strip()
    for method in ("dense", "spotlight"):
        assert method in printed, f"the Quick start printed no {method!r} line:\n{run.stdout}"
        assert printed[method] not in ("", "''", '""'), f"{method} generated no text:\n{run.stdout}"
