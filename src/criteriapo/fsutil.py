"""Filesystem helpers: a cache folder, a cross-process lock, and atomic folder publication."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "CRITERIAPO_CACHE"


def cache_dir() -> Path:
    """``$CRITERIAPO_CACHE``, else ``$XDG_CACHE_HOME/criteriapo``, else ``~/.cache/criteriapo``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "criteriapo"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) so concurrent processes queue."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` and the folders themselves to disk."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(dest: Path) -> Path:
    """A fresh temporary folder beside ``dest`` (same filesystem, so the final rename is atomic)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish_dir(tmp: Path, dest: Path) -> None:
    """Make ``tmp`` appear as ``dest`` in one step: fsync, then rename; a stale ``dest`` is replaced."""
    fsync_tree(tmp)
    if dest.exists():
        old = dest.parent / f".old-{dest.name}-{os.getpid()}"
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)
    fsync_dir(dest.parent)


def write_error(e: BaseException) -> str:
    """What went wrong in a failed write, in a user's words: "No space left on device (OSError)"."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} ({type(e).__name__})"
    return str(e).removeprefix("Error while serializing: ")  # safetensors' I/O errors
