"""What the reference cache's model key costs: a SHA-256 of every byte of a model folder.

Writes a folder with safetensors files of the given total size (random bytes; the size of Llama 3.2
3B in bf16 by default), then times the key three ways: hashing with the file in the page cache,
hashing after the page cache was dropped (when this process may drop it, i.e. as root on Linux),
and the recorded digest reused (size and modification time unchanged), which is what every run
after the first pays.

Run: .venv/bin/python benchmarks/model_key.py [--gb 6.4] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from criteriapo.models.refcache import model_key

CHUNK = 1 << 28  # 256 MiB written at a time


def write_folder(folder: Path, gb: float, shards: int = 2) -> None:
    total = int(gb * 1e9)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    g = torch.Generator().manual_seed(0)
    block = torch.randint(0, 256, (CHUNK,), dtype=torch.uint8, generator=g).numpy().tobytes()
    for i in range(shards):
        with (folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors").open("wb") as f:
            left = total // shards
            while left > 0:
                f.write(block[: min(CHUNK, left)])
                left -= CHUNK


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(folder: Path) -> float:
    t = time.perf_counter()
    model_key([folder], torch.bfloat16, torch.device("cpu"), torch.bfloat16, "sdpa")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=6.4, help="folder size in GB (Llama 3.2 3B bf16: 6.4)")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, tempfile.TemporaryDirectory() as cache:
        os.environ["CRITERIAPO_CACHE"] = cache  # records go to a fresh cache
        folder = Path(tmp)
        write_folder(folder, args.gb)
        rows = []
        if drop_page_cache():
            rows.append(("hash, page cache dropped (first run from a cold disk)", timed(folder)))
            for p in Path(cache, "digests").iterdir():
                p.unlink()
        timed(folder)  # warm the page cache
        for p in Path(cache, "digests").iterdir():
            p.unlink()
        rows.append(("hash, files in the page cache", timed(folder)))
        rows.append(("recorded digests reused (every later run)", timed(folder)))
        print(f"\nmodel key of a {args.gb:g} GB folder (sha256 of every byte):\n")
        print("| how | seconds | GB/s |\n|---|---|---|")
        for name, s in rows:
            rate = f"{args.gb / s:.2f}" if "reused" not in name else "-"
            print(f"| {name} | {s:.3f} | {rate} |")


if __name__ == "__main__":
    main()
