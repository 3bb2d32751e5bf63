"""Convert a GGUF file, once, into a normal safetensors model folder.

transformers reads GGUF (dequantizing to float32) but refuses to ``save_pretrained`` a model loaded
that way, so the weights are moved into a fresh model built from the same config without its
``quantization_config``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from criteriapo.errors import ModelLoadError
from criteriapo.fsutil import atomic_dir, cache_dir, file_lock

SOURCE_FILE = "criteriapo_source.json"  # written last into a converted folder: its presence = complete
log = logging.getLogger(__name__)


def is_complete(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file()


def gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, dest: Path, *, source: dict | None = None) -> Path:
    """Write ``dest`` (config, model.safetensors, tokenizer, chat template, generation config) from
    ``gguf``; atomic, and a no-op when a complete conversion is already there."""
    if is_complete(dest):
        return dest
    with file_lock(dest.parent / f".{dest.name}.lock"):
        if is_complete(dest):  # another process finished it while we waited
            return dest
        t0 = time.perf_counter()
        with atomic_dir(dest) as tmp:
            _write_folder(gguf, tmp)
            meta = {
                "gguf_file": str(gguf),
                "gguf_bytes": gguf.stat().st_size,
                "converted_in_s": round(time.perf_counter() - t0, 1),
                **(source or {}),
            }
            (tmp / SOURCE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        log.info("converted %s to %s in %.1f s", gguf.name, dest, time.perf_counter() - t0)
    return dest


def _write_folder(gguf: Path, out: Path) -> None:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf.parent, gguf.name
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # silence the per-tensor progress bars
    try:
        try:
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except (ValueError, KeyError, OSError) as e:
            raise ModelLoadError(f"{gguf}: transformers cannot read this GGUF file: {e}") from None
        fields = config.to_dict()
        for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
            fields.pop(key, None)
        plain = AutoModelForCausalLM.from_config(type(config).from_dict(fields))
        plain.load_state_dict(quantized.state_dict(), strict=True)
        plain.generation_config = quantized.generation_config
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
    finally:
        transformers.logging.set_verbosity(verbosity)
