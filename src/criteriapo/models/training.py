"""What a model needs before it trains: activation checkpointing switched on under the name this
transformers version has, and dropout switched off where the method needs a deterministic forward."""

from __future__ import annotations

import torch


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder block in backward. Earlier transformers 5.x releases (5.17 among them)
    name this ``gradient_checkpointing_enable`` only; later ones ``activation_checkpointing_enable``,
    keeping the old name as a deprecated alias."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def disable_dropout(model: torch.nn.Module) -> int:
    """Every dropout of ``model`` off: ``nn.Dropout`` modules (LoRA's included) get p = 0, and the
    float rates that attention reads at call time (``attention_dropout``, ``attn_pdrop``, ...) are
    set to 0 on the modules holding them. The config is left as it was, so an exported folder keeps
    the model's own settings. Returns how many were not already 0."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            changed += module.p != 0
            module.p = 0.0
            continue
        for name, value in list(vars(module).items()):
            if "drop" in name and isinstance(value, float) and not isinstance(value, bool) and value:
                setattr(module, name, 0.0)
                changed += 1
    return changed
