"""File helpers shared by the stages that write to disk (activations, checkpoints, hash exports, model saves).

What they guarantee (docs/guarantees.md): JSON is replaced atomically; a folder written with `atomic_dir` appears
whole or not at all; `write_sums` / `verify_sums` detect any changed, missing or extra file of a written folder; a
full disk becomes one `DiskFullError` sentence; `dir_lock` keeps two processes out of one folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from typing import Any

SUMS_FILE = "spotlight_sha256.json"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def read_json(path: str | os.PathLike, error: type[Exception], missing: str) -> dict[str, Any]:
    """Parse the JSON object at `path`; raise `error(missing)` when it is absent and `error` naming it when corrupt."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise error(missing)
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"corrupt {path}: {e}") from e
    if not isinstance(out, dict):
        raise error(f"corrupt {path}: expected a JSON object, found {type(out).__name__}")
    return out


class DiskFullError(OSError, ValueError):
    """No space left on the device: a write was abandoned (nothing half-written is left behind by the callers).

    A ValueError too, so that the command-line tools report it as one `error:` line like any other refusal."""


def _disk_full_cause(e: BaseException) -> bool:
    # orbax / tensorstore wrap the OSError (or only keep its text), so look along the whole chain.
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def disk_guard(what: str, cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Turn a full disk inside the block into `DiskFullError(what ...)`; `cleanup()` runs first (remove partial
    files). Other errors pass through unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not _disk_full_cause(e):
            raise
        if cleanup is not None:
            cleanup()
        raise DiskFullError(
            errno.ENOSPC, f"no space left on the device while {what}: free some space and run the same command again"
        ) from e


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_kw: Any) -> None:
    """Write JSON to a temporary file and rename it over `path`: a crash or a full disk never leaves half a file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"

    def drop_tmp():
        with contextlib.suppress(OSError):
            os.remove(tmp)

    with disk_guard(f"writing {path}", drop_tmp):
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, **dump_kw)
            os.replace(tmp, path)
        except BaseException:
            drop_tmp()
            raise


def check_folder_path(path: str | os.PathLike, what: str) -> str:
    """`path` as an absolute folder path; a ValueError when something that is not a folder is in the way."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} {path} exists but is not a folder: pass a folder path (or move the file away)")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Checksums of a written folder.

_CHUNK = 1 << 20


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def folder_sums(folder: str | os.PathLike) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` except the sums file itself."""
    folder = os.fspath(folder)
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder)
            if rel != SUMS_FILE:
                out[rel] = _sha256_file(full)
    return out


def write_sums(folder: str | os.PathLike) -> None:
    """Record the checksum of every file of a finished folder in `folder/spotlight_sha256.json`."""
    write_json_atomic(os.path.join(os.fspath(folder), SUMS_FILE), {"sha256": folder_sums(folder)})


def verify_sums(folder: str | os.PathLike) -> str | None:
    """None when every file matches `folder`'s sums file; else what is wrong, in a few words. A folder without a
    sums file raises FileNotFoundError (the caller decides whether that is acceptable)."""
    path = os.path.join(os.fspath(folder), SUMS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    try:
        with open(path, encoding="utf-8") as f:
            want = json.load(f)["sha256"]
        if not isinstance(want, dict):
            raise TypeError("sha256 is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its checksum file is unreadable ({type(e).__name__})"
    have = folder_sums(folder)
    missing = sorted(set(want) - set(have))
    changed = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    extra = sorted(set(have) - set(want))
    if missing:
        return f"{len(missing)} file(s) missing, e.g. {missing[0]}"
    if changed:
        return f"{len(changed)} file(s) changed since written (truncated or damaged), e.g. {changed[0]}"
    if extra:
        return f"{len(extra)} file(s) not written with it, e.g. {extra[0]}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# A folder that appears whole or not at all.


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, what: str, is_ours: Callable[[str], bool]) -> Iterator[str]:
    """Yield a fresh temporary folder beside `path`; when the block ends normally it takes `path`'s place.

    `path` may be absent, an empty folder, or a folder for which `is_ours(path)` is true (an earlier write of the
    same kind, which is replaced); anything else is refused, so that a user's folder is never deleted. On an error
    (a full disk included) the temporary folder is removed and `path` is left as it was. The swap is two renames:
    a crash between them leaves the previous folder as `.NAME.old-*` beside `path`.
    """
    path = check_folder_path(path, what)
    if os.path.isdir(path) and os.listdir(path) and not is_ours(path):
        raise ValueError(
            f"{path} exists and is not {what}: refusing to replace it (it may hold your files); choose another path "
            "or empty that folder"
        )
    parent, base = os.path.split(path)
    with disk_guard(f"writing {what} to {path}"):
        os.makedirs(parent, exist_ok=True)
        tmp = _sibling(parent, base, "tmp")
        try:
            yield tmp
            if os.path.isdir(path):
                old = _sibling(parent, base, "old")
                os.rename(path, old)
                try:
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(old, path)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _sibling(parent: str, base: str, kind: str) -> str:
    """A new hidden folder name beside `base` (made for "tmp"; only named for "old", which a rename creates).
    os.mkdir, not tempfile.mkdtemp: the folder keeps the umask's permissions once renamed into place."""
    while True:
        name = os.path.join(parent, f".{base}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        if kind != "tmp":
            return name
        with contextlib.suppress(FileExistsError):
            os.mkdir(name)
            return name


# ----------------------------------------------------------------------------------------------------------------
# One process per folder.


class FolderLockedError(ValueError):
    """Another process holds the lock of a folder (a second training run or collection in the same place)."""


@contextlib.contextmanager
def dir_lock(folder: str | os.PathLike, name: str, what: str) -> Iterator[None]:
    """Hold an exclusive `fcntl.flock` on `folder/name` for the block; `FolderLockedError` when another process
    (or another open of it in this one) holds it. The kernel drops the lock when its holder dies, so a killed run
    never leaves a stale lock behind."""
    import fcntl

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise FolderLockedError(
            f"{folder} is in use by another {what} (pid {holder}, lock file {path}): wait for it to finish, or use "
            "another folder"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
