"""Model folders are checked before any weights are read; only safetensors are loaded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from criteriapo.errors import ConfigError, ModelLoadError
from criteriapo.models import load_model, load_tokenizer, resolve_model


@pytest.fixture
def folder(tmp_path, tiny_llama_dir):
    out = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, out)
    return out


def test_local_folder_loads(folder):
    source = resolve_model(folder)
    assert (source.origin, source.path) == ("folder", folder)
    model = load_model(source, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert load_tokenizer(source).pad_token is not None


def test_pickle_only_folder_is_refused(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(
        ModelLoadError, match=r"weights only in pickle format \(pytorch_model.bin\).*safetensors only"
    ):
        resolve_model(folder)


def test_folder_without_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(folder)


def test_broken_config(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json: not valid JSON"):
        resolve_model(folder)


def test_folder_without_weights(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        resolve_model(folder)


def test_truncated_weights(folder):
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="truncated"):
        resolve_model(folder)


def test_garbage_weights(folder):
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        resolve_model(folder)


def test_index_naming_a_missing_shard(folder):
    (folder / "model.safetensors.index.json").write_text(
        json.dumps(
            {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        )
    )
    with pytest.raises(ModelLoadError, match="names 2 missing weight file"):
        resolve_model(folder)


def test_missing_tokenizer(folder):
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        resolve_model(folder)
    assert resolve_model(folder, need_tokenizer=False).path == folder


def test_remote_code_needs_consent(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Model"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="trust_remote_code: true"):
        resolve_model(folder)


def test_hub_id_not_in_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        ModelLoadError, match="not in the local Hugging Face cache, and CriteriaPO never downloads"
    ):
        resolve_model("meta-llama/Llama-3.2-3B-Instruct")


def test_unknown_name():
    with pytest.raises(ModelLoadError, match="no such folder or file, and not an embedded model"):
        resolve_model("./no/such/model")


def test_bad_dtype_and_device(folder):
    with pytest.raises(ConfigError, match="dtype must be one of"):
        load_model(folder, dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
            load_model(folder, device="cuda")


def test_hub_id_found_in_local_cache(tmp_path, monkeypatch, tiny_llama_dir):
    """A hub id already in the Hugging Face cache resolves to its snapshot, offline."""
    import huggingface_hub.constants

    repo = tmp_path / "models--acme--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_llama_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    source = resolve_model("acme/tiny")
    assert (source.origin, source.path) == ("hub-cache", snapshot)


def test_safetensors_header_that_is_not_an_object(folder):
    import struct

    header = b"[1, 2]"
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ModelLoadError, match="header is not a JSON object"):
        resolve_model(folder)


def test_unknown_device_is_a_config_error(folder):
    with pytest.raises(ConfigError, match="'gpu0' is not a device"):
        load_model(folder, device="gpu0")
