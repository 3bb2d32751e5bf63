"""Reference log-probs cached on disk, keyed by the model and by each scored sequence.

DPO's reference is scored once per sequence (prompt + completion, and where the completion starts);
the scores are kept under ``<cache>/refcache/<model key>.safetensors`` and reused across epochs,
runs and recipes: a rerun, a resumed run or another recipe on the same data scores nothing again.

The model key is a SHA-256 of every byte of every weight file and of ``config.json`` (and an
adapter's files), with the weights' dtype, the device type, the autocast and the attention
implementation: any change to any tensor, or to how the model computes, is another key. Hashing
reads the whole model (about 1 GB/s here), so each file's digest is recorded once in
``<cache>/digests/`` and reused while the file keeps its size and modification time; folders that
CriteriaPO exports are recorded at export time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from criteriapo.fsutil import cache_dir, file_lock

SequenceKey = tuple[int, tuple[int, ...]]  # (prompt length, prompt + completion ids)
KEY_FILES = ("config.json", "adapter_config.json")  # besides every *.safetensors and *.py (remote code)
KEY_VERSION = 3  # raised whenever how a sequence is scored changes, so old entries are not reused


def model_files(folder: Path) -> list[Path]:
    """The files that decide what a model folder computes."""
    folder = Path(folder)
    return sorted(
        p for p in folder.iterdir() if p.name.endswith((".safetensors", ".py")) or p.name in KEY_FILES
    )


def _record_path(path: Path) -> Path:
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return cache_dir() / "digests" / f"{name}.json"


def file_digest(path: Path) -> str:
    """SHA-256 of every byte of ``path``, from the record while its inode, size, modification and
    change times are unchanged (ctime too: a coarse mtime can miss a same-size rewrite)."""
    st = path.stat()
    record = _record_path(path)
    stamp = {
        "path": str(path.resolve()),
        "inode": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        if {k: saved.get(k) for k in stamp} == stamp:
            return saved["sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no record, or an unreadable one: hash again
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({**stamp, "sha256": digest}), encoding="utf-8")
        os.replace(tmp, record)
    except OSError:
        pass  # a read-only cache only costs hashing again next time
    return digest


def record_digests(folder: Path) -> None:
    """Hash a model folder's files now (after an export), so the first run from it need not."""
    for p in model_files(folder):
        file_digest(p)


def folder_digest(folder: Path) -> str:
    """SHA-256 over the digests of the files that decide what a model folder computes."""
    h = hashlib.sha256()
    for p in model_files(folder):
        h.update(f"|{p.name}={file_digest(p)}".encode())
    return h.hexdigest()


def model_key(
    folders: list[Path],
    dtype: torch.dtype,
    device: torch.device,
    autocast: torch.dtype | None = None,
    attention: str | None = None,
    layout: str = "",
) -> str:
    """``layout`` names anything else that changes the numbers: packing, FSDP's compute dtype."""
    h = hashlib.sha256(
        f"v{KEY_VERSION}|{dtype}|{device.type}|autocast={autocast}|attention={attention}|{layout}".encode()
    )
    for folder in folders:
        for p in model_files(folder):
            h.update(f"|{p.name}={file_digest(p)}".encode())
    return h.hexdigest()[:32]


def _digest(key: SequenceKey) -> bytes:
    n, ids = key
    return hashlib.sha1(f"{n}|{','.join(map(str, ids))}".encode()).digest()


class ReferenceCache(dict):
    """A ``{sequence: (log-prob, tokens)}`` dict (what :func:`score_pairs` fills) backed by a file."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self._saved: dict[bytes, tuple[float, int]] = {}
        if path.exists():
            t = load_file(path)
            digests = t["digests"].numpy().tobytes()
            for i, (lp, n) in enumerate(zip(t["logps"].tolist(), t["tokens"].tolist(), strict=True)):
                self._saved[digests[20 * i : 20 * (i + 1)]] = (lp, n)

    def __missing__(self, key: SequenceKey) -> tuple[float, int]:
        found = self._saved.get(_digest(key))
        if found is None:
            raise KeyError(key)
        self[key] = found
        return found

    def __contains__(self, key: object) -> bool:
        if super().__contains__(key):
            return True
        try:
            self[key]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def save(self) -> None:
        """Add this run's scores to the file (atomically; concurrent runs queue on a lock)."""
        new = {_digest(k): v for k, v in self.items()}
        with file_lock(self.path.with_suffix(".lock")):
            merged = {
                **(ReferenceCache(self.path)._saved if self.path.exists() else {}),
                **self._saved,
                **new,
            }
            if not merged:
                return
            digests = torch.frombuffer(bytearray(b"".join(merged)), dtype=torch.uint8)
            values = list(merged.values())
            tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
            save_file(
                {
                    "digests": digests,
                    "logps": torch.tensor([v[0] for v in values], dtype=torch.float64),
                    "tokens": torch.tensor([v[1] for v in values], dtype=torch.int64),
                },
                str(tmp),
            )
            os.replace(tmp, self.path)
            self._saved = merged


def score_layout(packing: bool, fsdp: Any = None) -> str:
    """The ``layout`` part of a cache key: how the scored batches were laid out (packed rows, and the
    FSDP2 compute dtype of a sharded run)."""
    return f"packing={packing}|fsdp={fsdp}"


def reference_cache(
    folders: list[Path], model: torch.nn.Module, autocast: torch.dtype | None = None, layout: str = ""
) -> ReferenceCache:
    """The cache for ``model`` as loaded from ``folders`` (its folder, and a LoRA adapter's base),
    scored under ``autocast`` in ``layout``."""
    p = next(model.parameters())
    attention = getattr(model.config, "_attn_implementation", None)
    key = model_key(folders, p.dtype, p.device, autocast, attention, layout)
    path = cache_dir() / "refcache" / f"{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    return ReferenceCache(path)
