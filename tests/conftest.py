"""Shared fixtures. The embedded model is fetched once into the user's cache (about 30 s the first
time, instant after); tiny random models are built in temporary folders."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from criteriapo.models import fetch_embedded

    return fetch_embedded("smollm2")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from criteriapo.models import load_tokenizer

    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def chat_tokenizer(smollm2_tokenizer):
    from criteriapo.data.tokenize import ChatTokenizer

    return ChatTokenizer(smollm2_tokenizer, name="smollm2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 2-layer random Llama with the embedded model's tokenizer, saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder
