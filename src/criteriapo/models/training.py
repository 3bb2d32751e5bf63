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


# matrix products a checkpointed block's recompute can skip, each with the position of its left
# operand (a linear layer's input: its last dimension is what the product reads)
MATMUL_OPS = {aten.mm.default: 0, aten.addmm.default: 1}


def enable_activation_checkpointing(
    model: torch.nn.Module, keep_attention: bool = False, keep_projections: bool = False
) -> None:
    """Recompute each decoder block in backward. With ``keep_attention`` the attention kernels'
    outputs (and log-sum-exps) are kept from the forward instead (selective checkpointing), so the
    recompute never attends again: hidden-size floats per position and layer for the work of
    attending every earlier position. (Nothing after attention needs keeping: the recompute stops
    once the last tensor backward needs is made, the MLP's down projection's input, so that matmul
    is never recomputed.) With ``keep_projections`` the outputs of the matmuls that read the hidden
    width are kept too (a Llama block's q, k, v, o, gate and up projections: 4608 floats per
    position and layer on the embedded model, 8 times the hidden size), so a Llama or Qwen2 block's
    recompute runs no matmul, only element-wise work; the down projection reads the MLP's width and
    is never recomputed there, so it is not kept. Elsewhere some matmuls stay in the recompute: an
    output projection whose input is narrower or wider than the hidden size (Qwen3, Gemma), a down
    projection that a norm after the MLP needs (Gemma 2 and 3, OLMo 2), LoRA's adapters. Earlier
    transformers 5.x releases (5.17 among them) name this ``gradient_checkpointing_enable`` only;
    later ones ``activation_checkpointing_enable``, keeping the old name as a deprecated alias."""
    kwargs = {"use_reentrant": False}
    if keep_attention or keep_projections:
        hidden = _hidden_width(model) if keep_projections else None
        policy = partial(_keep, keep_attention, hidden)
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, policy)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def disable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing off, under the name this transformers version has."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def _hidden_width(model: torch.nn.Module) -> int:
    """The width of the residual stream: the config's hidden size, else the input embedding's."""
    hidden = getattr(model.config.get_text_config(), "hidden_size", None)
    return hidden or model.get_input_embeddings().embedding_dim


def _keep(keep_attention: bool, hidden: int | None, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing's choice for one op of a checkpointed block's forward: keep the
    attention kernels' outputs (``keep_attention``) and the matmuls' that read ``hidden`` wide
    inputs (when it is not None)."""
    if keep_attention and op in ATTENTION_OPS:
        return CheckpointPolicy.MUST_SAVE
    if hidden is not None and op in MATMUL_OPS and args[MATMUL_OPS[op]].shape[-1] == hidden:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


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
