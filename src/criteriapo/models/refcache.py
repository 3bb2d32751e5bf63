"""Reference log-probs cached on disk, keyed by the model and by each scored sequence.

DPO's reference is scored once per sequence (prompt + completion, and where the completion starts);
the scores are kept under ``<cache>/refcache/<model key>.safetensors`` and reused across epochs,
runs and recipes: a rerun, a resumed run or another recipe on the same data scores nothing again.
The model key covers the weight files (names, sizes, safetensors headers, and the first and last
MiB of each: cheap for a 3B model, and any retraining changes them), the dtype and the device type.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from criteriapo.fsutil import cache_dir, file_lock

SequenceKey = tuple[int, tuple[int, ...]]  # (prompt length, prompt + completion ids)
EDGE = 1 << 20


def model_key(folders: list[Path], dtype: torch.dtype, device: torch.device) -> str:
    h = hashlib.sha256(f"{dtype}|{device.type}".encode())
    files = sorted(p for f in folders for p in Path(f).iterdir() if p.name.endswith(".safetensors"))
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}|{size}".encode())
        with p.open("rb") as f:
            h.update(f.read(EDGE))
            f.seek(max(0, size - EDGE))
            h.update(f.read(EDGE))
    return h.hexdigest()[:24]


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


def reference_cache(folders: list[Path], model: torch.nn.Module) -> ReferenceCache:
    """The cache for ``model`` as loaded from ``folders`` (its folder, and a LoRA adapter's base)."""
    p = next(model.parameters())
    path = cache_dir() / "refcache" / f"{model_key(folders, p.dtype, p.device)}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    return ReferenceCache(path)
