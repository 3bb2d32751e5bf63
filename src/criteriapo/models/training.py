"""What a model needs before it trains: activation checkpointing switched on under the name this
transformers version has (with what each block keeps from its forward), and dropout switched off
where the method needs a deterministic forward."""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

aten = torch.ops.aten
# attention kernels whose outputs (and log-sum-exps) a checkpointed block can keep: the CPU flash
# kernel and the GPU ones SDPA or a lower-right causal mask can pick
ATTENTION_OPS = frozenset(
    {
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
        aten._efficient_attention_forward.default,
    }
)


def enable_activation_checkpointing(model: torch.nn.Module, keep_attention: bool = False) -> None:
    """Recompute each decoder block in backward. With ``keep_attention`` the attention kernels'
    outputs (and log-sum-exps) are kept from the forward instead (selective checkpointing), so the
    recompute never attends again: hidden-size floats per position and layer for the work of
    attending every earlier position. (Nothing after attention needs keeping: the recompute stops
    once the last tensor backward needs is made, the MLP's down projection's input, so that matmul
    is never recomputed.) Earlier transformers 5.x releases (5.17 among them) name this
    ``gradient_checkpointing_enable`` only; later ones ``activation_checkpointing_enable``, keeping
    the old name as a deprecated alias."""
    kwargs = {"use_reentrant": False}
    if keep_attention:
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _keep_attention)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing's choice for one op of a checkpointed block's forward."""
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


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
