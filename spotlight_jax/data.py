"""Text datasets -> tokenised fixed-length samples (concatenate documents with EOS separators, then chunk).

Sources (all through `datasets`):
- `"stdlib"` (default, offline): the Python standard library `.py` sources of the running interpreter
  (`sysconfig.get_paths()["stdlib"]`);
- a local file or glob: `.json` / `.jsonl` (optionally `.gz`), `.txt`, `.parquet`, `.csv`;
- a Hugging Face hub dataset name (`"org/name"` or `"org/name:config"`): only downloaded when
  `allow_download=True` (the CLI's `--allow-download`); otherwise only the local `datasets` cache is used.

Documents can be split deterministically into `train` / `heldout` parts, so calibration and evaluation never share
a document.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

STDLIB = "stdlib"
_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}
PARTS = ("all", "train", "heldout")


class DataSourceError(ValueError):
    """A dataset could not be found / read (with what to do about it)."""


def stdlib_files(root: str | None = None) -> list[str]:
    """Sorted `.py` files of the standard library (site-packages and test data excluded)."""
    root = root or sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    if not files:
        raise DataSourceError(f"no .py files under the standard library folder {root}")
    return files


def _local_builder(path: str) -> str | None:
    base = path[:-3] if path.endswith(".gz") else path
    return _LOCAL_BUILDERS.get(os.path.splitext(base)[1].lower())


def _load_local(datasets: Any, builder: str, files: list[str]) -> Any:
    """`datasets.load_dataset` of local files, its failures (bad UTF-8, bad JSON, an empty file) as one sentence."""
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        raise DataSourceError(f"data file {empty[0]} is empty: give a file with at least one document")
    try:
        return datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as e:
        cause, seen = e, set()
        while cause.__cause__ or cause.__context__:  # DatasetGenerationError keeps the real reason underneath
            if id(cause) in seen:
                break
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        hint = "the file must be UTF-8 text" if isinstance(cause, UnicodeDecodeError) else f"is it valid {builder}?"
        names = files[0] if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more)"
        raise DataSourceError(f"could not read {names} ({type(cause).__name__}: {str(cause)[:200]}): {hint}") from e


def _check_texts(texts: Sequence[Any], source: str) -> None:
    """Text rows must be strings (None / missing counts as an empty document, which is skipped)."""
    for i, t in enumerate(texts):
        if t is not None and not isinstance(t, str):
            raise DataSourceError(
                f"dataset {source!r}: row {i} of the text column is a {type(t).__name__} ({str(t)[:40]!r}), not text: "
                "point --text-field at a column of strings"
            )


def load_documents(
    source: str = STDLIB,
    *,
    split: str = "train",
    text_field: str = "text",
    allow_download: bool = False,
    max_documents: int | None = None,
) -> Any:
    """A `datasets.Dataset` with a `text` column (and `source` where known)."""
    import datasets

    if source == STDLIB:
        files = stdlib_files()[:max_documents] if max_documents else stdlib_files()
        texts = []
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                texts.append(fh.read())
        return datasets.Dataset.from_dict({"text": texts, "source": [os.path.relpath(f) for f in files]})

    matches = sorted(glob.glob(os.path.expanduser(source)))
    looks_local = bool(matches) or _local_builder(source) is not None or source.startswith((".", "/", "~"))
    if looks_local:
        if not matches:
            raise DataSourceError(f"no such data file: {source}")
        builders = {_local_builder(m) for m in matches}
        if None in builders or len(builders) != 1:
            raise DataSourceError(
                f"cannot read {matches[:3]}: use one kind of .json/.jsonl/.txt/.parquet/.csv (optionally .gz)"
            )
        ds = _load_local(datasets, builders.pop(), matches)
    else:
        name, _, config = source.partition(":")
        # Never touch the network unless asked: `datasets` reads its offline switch at import time, so flip the
        # module constant (and the env var, for subprocesses) for the duration of the call.
        saved = (os.environ.get("HF_DATASETS_OFFLINE"), getattr(datasets.config, "HF_HUB_OFFLINE", None))
        if not allow_download:
            os.environ["HF_DATASETS_OFFLINE"] = "1"
            datasets.config.HF_HUB_OFFLINE = True
        try:
            ds = datasets.load_dataset(name, config or None, split=split)
        except Exception as e:
            hint = "" if allow_download else " Pass --allow-download (allow_download=True) to fetch it from the hub."
            raise DataSourceError(f"dataset {source!r} is not available ({type(e).__name__}: {e}).{hint}") from e
        finally:
            if not allow_download:
                if saved[0] is None:
                    os.environ.pop("HF_DATASETS_OFFLINE", None)
                else:
                    os.environ["HF_DATASETS_OFFLINE"] = saved[0]
                datasets.config.HF_HUB_OFFLINE = saved[1]
    if text_field not in ds.column_names:
        raise DataSourceError(f"dataset {source!r} has no {text_field!r} column (columns: {ds.column_names})")
    if len(ds) == 0:
        raise DataSourceError(f"dataset {source!r} has no rows")
    if text_field != "text":
        ds = (
            ds.rename_column(text_field, "text")
            if "text" not in ds.column_names
            else ds.map(lambda r: {"text": r[text_field]})
        )
    if max_documents:
        ds = ds.select(range(min(max_documents, len(ds))))
    return ds


def split_documents(num_docs: int, part: str = "all", heldout_fraction: float = 0.2, seed: int = 0) -> list[int]:
    """Deterministic document indices of a part: a seeded permutation, the last `heldout_fraction` held out."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if part == "all":
        return list(range(num_docs))
    perm = np.random.default_rng(seed).permutation(num_docs)
    n_held = max(1, round(heldout_fraction * num_docs)) if num_docs > 1 else 0
    chosen = perm[num_docs - n_held :] if part == "heldout" else perm[: num_docs - n_held]
    return sorted(int(i) for i in chosen)


def pack_samples(
    texts: Sequence[str],
    tokenizer: Any,
    seq_len: int,
    num_samples: int,
    *,
    eos_id: int | None = None,
    shuffle_seed: int | None = 0,
    batch_docs: int = 64,
    allow_fewer: bool = True,
) -> np.ndarray:
    """Tokenise documents (shuffled with `shuffle_seed`, None = keep order), join with EOS, cut into samples.

    -> int32 [num_samples', seq_len]; fewer than asked when the text runs out (with `allow_fewer`), else an error.
    """
    if seq_len < 2 or num_samples < 1:
        raise ValueError(f"need seq_len >= 2 and num_samples >= 1, got {seq_len}, {num_samples}")
    eos = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id: pass eos_id=")
    order = np.arange(len(texts))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(texts))
    _check_texts(texts, "texts")
    need = seq_len * num_samples
    buf: list[int] = []
    for lo in range(0, len(order), batch_docs):
        chunk = [texts[int(i)] for i in order[lo : lo + batch_docs]]
        chunk = [t for t in chunk if t and t.strip()]
        if not chunk:
            continue
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            buf.extend(ids)
            buf.append(eos)
        if len(buf) >= need:
            break
    have = len(buf) // seq_len
    if not buf:
        raise DataSourceError("the documents are all empty: there is no text to make samples from")
    if have == 0:
        raise DataSourceError(f"the documents hold {len(buf)} tokens: not even one {seq_len}-token sample")
    if have < num_samples and not allow_fewer:
        raise DataSourceError(f"the documents hold {have} samples of {seq_len} tokens, {num_samples} asked")
    n = min(have, num_samples)
    return np.asarray(buf[: n * seq_len], dtype=np.int32).reshape(n, seq_len)


def build_samples(
    tokenizer: Any,
    source: str = STDLIB,
    *,
    seq_len: int = 2048,
    num_samples: int = 32,
    part: str = "all",
    heldout_fraction: float = 0.2,
    seed: int = 0,
    text_field: str = "text",
    split: str = "train",
    allow_download: bool = False,
    eos_id: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Documents of `source` (the chosen part) -> (samples int32 [num, seq_len], description for manifests).

    A `.npz` source holds samples already tokenised (`save_samples`, on a machine that has the corpus and
    `datasets`): its first `num_samples` rows are used, and its recorded description is kept.
    """
    if str(source).endswith(".npz"):
        return load_samples(source, seq_len=seq_len, num_samples=num_samples)
    ds = load_documents(source, split=split, text_field=text_field, allow_download=allow_download)
    idx = split_documents(len(ds), part, heldout_fraction, seed)
    texts = ds.select(idx)["text"]
    _check_texts(texts, source)
    samples = pack_samples(texts, tokenizer, seq_len, num_samples, eos_id=eos_id, shuffle_seed=seed)
    info = {
        "source": source,
        "part": part,
        "heldout_fraction": heldout_fraction,
        "documents": len(idx),
        "seed": seed,
        "seq_len": seq_len,
        "num_samples": int(samples.shape[0]),
    }
    return samples, info


def save_samples(path: str, samples: np.ndarray, info: dict[str, Any]) -> None:
    """Write tokenised samples and their description (what `build_samples` returned) to a `.npz` file."""
    np.savez_compressed(path, samples=np.asarray(samples, np.int32), info=np.asarray(json.dumps(info)))


def load_samples(path: str, *, seq_len: int, num_samples: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Samples saved by `save_samples`; their length must be `seq_len` and there must be `num_samples` of them."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no token file at {path}: write one with spotlight_jax.data.save_samples")
    try:
        with np.load(path, allow_pickle=False) as f:
            samples, info = f["samples"], json.loads(str(f["info"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # JSONDecodeError is a ValueError
        raise DataSourceError(
            f"{path} is not a token file written by save_samples ({type(e).__name__}: {e}): rebuild it"
        ) from e
    if not np.issubdtype(samples.dtype, np.integer) or not isinstance(info, dict):
        raise DataSourceError(f"{path} holds {samples.dtype} samples / {type(info).__name__} info: rebuild it")
    if samples.ndim != 2 or samples.shape[1] != seq_len or samples.shape[0] < num_samples:
        raise ValueError(
            f"{path} holds samples of shape {samples.shape}; this run needs {num_samples} x {seq_len}: "
            "set --seq-len / --num-samples to match or rebuild the file"
        )
    info = {**info, "token_file": os.path.basename(path), "num_samples": num_samples}
    return samples[:num_samples].astype(np.int32), info
