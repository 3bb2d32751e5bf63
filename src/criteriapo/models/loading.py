"""Resolve what the user named to a local safetensors folder, check it, then load it.

Accepted: an embedded model's name (fetched on demand), a local Hugging Face folder (safetensors
only), a ``.gguf`` file (converted once into the cache), or a hub id already in the local Hugging
Face cache (nothing is downloaded), or a LoRA adapter folder (``adapter_config.json``) whose base
model is any of those. Every check runs before any weights are read.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from criteriapo.errors import ConfigError, ModelLoadError
from criteriapo.models.embedded import EMBEDDED, fetch_embedded, find_embedded
from criteriapo.models.gguf import convert_gguf, gguf_cache_path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelSource:
    """A checked local model folder and where it came from."""

    spec: str
    path: Path
    origin: str  # embedded | folder | gguf | hub-cache | adapter
    base: Path | None = None  # for an adapter folder: its base model's folder


def resolve_model(
    spec: str | Path, *, need_tokenizer: bool = True, trust_remote_code: bool = False
) -> ModelSource:
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() == ".gguf":
            folder, origin = convert_gguf(path, gguf_cache_path(path)), "gguf"
        elif (
            path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").exists()
        ):
            return _adapter_source(spec, path, need_tokenizer, trust_remote_code)
        elif path.is_dir():
            folder, origin = path, "folder"
        else:
            raise ModelLoadError(f"{spec}: expected a model folder or a .gguf file")
    elif (m := find_embedded(spec)) is not None:
        folder, origin = fetch_embedded(m.name), "embedded"
    elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        folder, origin = _hub_cache(spec), "hub-cache"
    else:
        raise ModelLoadError(
            f"{spec}: no such folder or file, and not an embedded model "
            f"({', '.join(EMBEDDED)}) or a hub id (owner/name)"
        )
    check_model_folder(folder, need_tokenizer=need_tokenizer, trust_remote_code=trust_remote_code)
    return ModelSource(spec, folder, origin)


def _adapter_source(spec: str, folder: Path, need_tokenizer: bool, trust_remote_code: bool) -> ModelSource:
    """A LoRA adapter folder: its weights checked, its base model resolved like any model."""
    config_path = folder / "adapter_config.json"
    try:
        base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ModelLoadError(f"{config_path}: not valid JSON ({e})") from None
    if not base:
        raise ModelLoadError(f"{config_path}: names no base_model_name_or_path, so the adapter has no base")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        raise ModelLoadError(
            f"{folder}: no adapter_model.safetensors"
            + (f" (only pickle: {', '.join(pickles)}; CriteriaPO reads safetensors only)" if pickles else "")
        )
    _check_safetensors(weights)
    if need_tokenizer and not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise ModelLoadError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        base_source = resolve_model(base, need_tokenizer=False, trust_remote_code=trust_remote_code)
    except ModelLoadError as e:
        raise ModelLoadError(f"{folder} is a LoRA adapter whose base model cannot be loaded: {e}") from None
    return ModelSource(spec, folder, "adapter", base_source.path)


def _hub_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError, or an invalid repo id
        raise ModelLoadError(
            f"{repo_id}: not in the local Hugging Face cache, and CriteriaPO never downloads. "
            "Download the model folder where you have access and pass its path"
        ) from None


def check_model_folder(folder: Path, *, need_tokenizer: bool = True, trust_remote_code: bool = False) -> None:
    """Refuse a folder that is missing files, holds only pickle weights, or has truncated weights."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder}: no config.json, so this is not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelLoadError(f"{config_path}: has no model_type; it is not a transformers model config")
    if config.get("auto_map") and not trust_remote_code:
        raise ModelLoadError(
            f"{folder}: this model needs its own Python code (auto_map in config.json). "
            "Load it only if you trust its author, with trust_remote_code: true"
        )
    for f in _weight_files(folder):
        _check_safetensors(f)
    if need_tokenizer and not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the "
            "tokenizer of the model this folder came from into it"
        )


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelLoadError(
                f"{folder}: the index names {len(missing)} missing weight file(s): "
                f"{', '.join(missing[:5])}; the download or copy is incomplete"
            )
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{folder}: weights only in pickle format ({', '.join(pickles[:3])}). Loading pickle can run "
            "arbitrary code, so CriteriaPO reads safetensors only. Convert once, where you trust the file: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder)"
        )
    raise ModelLoadError(f"{folder}: no weights (model.safetensors or model.safetensors.index.json)")


def _check_safetensors(path: Path) -> None:
    """Header readable and every tensor's bytes present: catches truncated copies before loading."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise TypeError("header is not a JSON object")
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({e})") from None
    if 8 + n + end > size:
        raise ModelLoadError(
            f"{path}: truncated ({size} bytes, the header promises {8 + n + end}); copy or download it again"
        )


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but no CUDA GPU is visible; use device: cpu")
    return device


def pick_dtype(dtype: Any, device: str) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        return (
            torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
        )
    return getattr(torch, dtype)


def load_model(
    model: str | Path | ModelSource,
    *,
    dtype: Any = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> Any:
    """A causal LM in eval mode on ``device``; weights read from safetensors only. ``dtype`` is one
    of ``DTYPES`` or a ``torch.dtype``."""
    from transformers import AutoModelForCausalLM

    source = (
        model
        if isinstance(model, ModelSource)
        else resolve_model(model, need_tokenizer=False, trust_remote_code=trust_remote_code)
    )
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    try:
        m = AutoModelForCausalLM.from_pretrained(
            (source.base or source.path).resolve(),  # absolute: an adapter made from it records this path
            dtype=torch_dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{source.path}: transformers cannot load this model: {e}") from None
    if source.base is not None:  # the adapter merged into its base: a plain model from here on
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, source.path).merge_and_unload()
    return m.to(device).eval()


def load_tokenizer(model: str | Path | ModelSource, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    source = (
        model if isinstance(model, ModelSource) else resolve_model(model, trust_remote_code=trust_remote_code)
    )
    try:
        tok = AutoTokenizer.from_pretrained(
            source.path, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{source.path}: transformers cannot load this tokenizer: {e}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # batching needs a pad token; its positions are masked anyway
    return tok
