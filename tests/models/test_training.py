"""Preparing a model to train: dropout off everywhere it hides, activation checkpointing on."""

from __future__ import annotations

import torch

from criteriapo.config import LoraConfig
from criteriapo.models.lora import apply_lora
from criteriapo.models.training import disable_dropout, enable_activation_checkpointing
from tests.zoo import VOCAB, zoo_model

IDS = torch.randint(3, VOCAB - 4, (2, 10), generator=torch.Generator().manual_seed(0))


def logits_twice_in_train_mode(model) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    return model(input_ids=IDS).logits, model(input_ids=IDS).logits


def test_dropout_modules_and_attention_rates_are_switched_off():
    for arch, extra in (
        ("gpt2", {}),
        ("llama", {"attention_dropout": 0.5}),
        ("phi", {"attention_dropout": 0.5}),
    ):
        model = zoo_model(arch, **extra)
        a, b = logits_twice_in_train_mode(model)
        assert not torch.equal(a, b), arch  # dropout is on: two forwards differ
        assert disable_dropout(model) > 0
        a, b = logits_twice_in_train_mode(model)
        assert torch.equal(a, b), arch
        torch.testing.assert_close(a, model.eval()(input_ids=IDS).logits)  # train mode computes as eval
        assert model.config.to_dict() == zoo_model(arch, **extra).config.to_dict()  # config untouched


def test_lora_dropout_is_switched_off_too():
    model = apply_lora(zoo_model("llama"), LoraConfig(enabled=True, r=4, dropout=0.3))
    with torch.no_grad():  # trained adapters: B is no longer zero, so their dropout shows
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    a, b = logits_twice_in_train_mode(model)
    assert not torch.equal(a, b)
    disable_dropout(model)
    a, b = logits_twice_in_train_mode(model)
    assert torch.equal(a, b)


def test_activation_checkpointing_is_switched_on():
    model = zoo_model("llama")
    enable_activation_checkpointing(model)
    assert model.is_activation_checkpointing
    assert model.config.use_cache is False
    model.train()
    ids = torch.randint(3, VOCAB - 4, (2, 10))
    model(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
