"""Filesystem helpers: a cache folder, cross-process locks (a queue, and a run folder's one owner),
and atomic folder publication."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from criteriapo.errors import CriteriaPOError

log = logging.getLogger(__name__)

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


class FolderInUse(CriteriaPOError):
    """Another run owns the folder."""


RUN_LOCK = ".criteriapo.lock"


def _owner_text(raw: str) -> str:
    try:
        o = json.loads(raw)
        return f"pid {o['pid']} on {o['host']}, started {o['started']}: {o['command']}"
    except (ValueError, KeyError, TypeError):
        return "an unknown process"


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Own ``folder`` for one run: its lock file (``.criteriapo.lock``, naming the owner's pid, host,
    start time and command) is held under an exclusive ``flock`` from before anything is written
    until the run ends. A second run into the folder stops at once, naming the first. The kernel
    drops a dead process's lock, so a lock file left by a killed run is stale: it is taken over,
    with a warning. On the way out the lock file goes, and so does the folder if this run created it
    and left nothing in it (a run refused by its checks leaves no empty folder)."""
    if folder.exists() and not folder.is_dir():
        raise FolderInUse(f"output folder {folder} is a file, not a folder: choose another output_dir")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError) as e:
        raise FolderInUse(
            f"cannot create output folder {folder}: {e.strerror}; choose another output_dir"
        ) from e
    path = folder / RUN_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner_text(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            raise FolderInUse(
                f"{folder} is in use by another run ({owner}). Wait for it to end, stop it, or choose "
                "another output_dir"
            ) from None
        left = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        if left.strip():
            log.warning("%s: taking over a stale lock (%s): that run is gone", folder, _owner_text(left))
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # still held: a run that opened it meanwhile is refused
            if created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty
    finally:
        os.close(fd)


def plain_modes(folder: Path) -> None:
    """Give every file under ``folder`` the mode a plain write gives (0666 less the umask): some
    writers go through a private temporary file (0600), which would leave a shared model unreadable
    to the rest of its group."""
    mask = os.umask(0)
    os.umask(mask)
    for root, _dirs, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


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


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """The one way a folder is written: fill the staging folder this yields (beside ``dest``); when
    the block ends normally it replaces ``dest`` in one step (:func:`publish_dir`). When the block or
    the publication raises, the staging folder is removed and ``dest`` is as it was."""
    tmp = staging_dir(dest)
    try:
        yield tmp
        publish_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_error(e: BaseException) -> str:
    """What went wrong in a failed write, in a user's words: "No space left on device (OSError)"."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} ({type(e).__name__})"
    return str(e).removeprefix("Error while serializing: ")  # safetensors' I/O errors
