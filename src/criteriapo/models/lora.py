"""LoRA through peft: adapters on the chosen linear layers, the base weights frozen.

For DPO the reference is the same model with its adapters switched off, so no second copy is held.
On export the adapters are merged into full weights (a plain model folder), or kept as an adapter
folder (``adapter_config.json`` + ``adapter_model.safetensors``) that names its base model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from criteriapo.config import LoraConfig
from criteriapo.errors import ConfigError


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> Any:
    """``model`` wrapped with LoRA adapters; only the adapters train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = cfg.target_modules
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if targets != ["all-linear"]:
        missing = sorted(set(targets) - present)
        if missing:
            raise ConfigError(
                f"lora.target_modules: {', '.join(missing)} not found in this model; its linear layers "
                f"are {', '.join(sorted(present))} (or use [all-linear])"
            )
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def _inner(model: Any) -> Any:
    return getattr(model, "lm", model)  # a LogpsModule (FSDP2's root) holds the model as .lm


def is_lora(model: Any) -> bool:
    inner = _inner(model)
    return hasattr(inner, "disable_adapter") and hasattr(inner, "peft_config")


@contextlib.contextmanager
def adapters_off(model: Any) -> Iterator[None]:
    """The base model inside a LoRA model: the DPO reference when the policy is a LoRA model."""
    if is_lora(model):
        with _inner(model).disable_adapter():
            yield
    else:
        yield


def for_export(model: Any, keep_adapter: bool) -> Any:
    """What export writes: the adapters merged into the weights, or the LoRA model itself."""
    if not is_lora(model) or keep_adapter:
        return model
    return model.merge_and_unload()


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
