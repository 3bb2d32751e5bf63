"""Precision that trains: which dtype the weights are held in, and what the compute runs under.

An Adam step moves a weight by about the learning rate. A bfloat16 weight keeps 8 bits of
mantissa, so a weight of 0.02 is spaced 1.2e-4 from its neighbours and any step smaller than half
of that rounds away: at DPO's usual 5e-7, bf16 weights with a plain AdamW barely move at all. Hence:

- ``fp32``: float32 weights and compute.
- ``bf16-mixed``: float32 (master) weights, forward and backward under bf16 autocast. The default
  whenever ``model.dtype`` is a half type (``auto`` on a GPU). With LoRA only the adapters train
  (peft keeps them in float32), so the frozen base stays in ``model.dtype``.
- ``bf16-true``: bf16 weights and optimizer states, for the memory-bound; the optimizer must be one
  that rounds stochastically (``optim.name: adamw_sr``, torchao's) or the learning rate must be
  large enough for bf16, which :func:`check_updates_survive` verifies on the loaded weights.

The reference model and every evaluation run under the same autocast as the policy, so the first
step's log-ratios are zero in every setting.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from criteriapo.config import OptimConfig
from criteriapo.errors import ConfigError

HALF = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16-mixed | bf16-true | fp16 (a float16 model loaded outside training)
    weights: torch.dtype  # what the trained weights are held in
    autocast: torch.dtype | None  # the compute dtype of forward and backward, or None

    def context(self, device: torch.device | str) -> Any:
        """The autocast of training, for every forward that must match it (reference, eval)."""
        device_type = torch.device(device).type
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast)


def resolve_precision(name: str, model_dtype: torch.dtype, lora: bool = False) -> Precision:
    """``train.precision`` with ``model.dtype`` resolved to ``model_dtype``."""
    if name == "auto":
        name = "bf16-mixed" if model_dtype in HALF else "fp32"
    if name == "fp32":
        return Precision(name, torch.float32, None)
    if name == "bf16-mixed":  # a frozen LoRA base needs no float32 copy: only the adapters step
        return Precision(name, model_dtype if lora else torch.float32, torch.bfloat16)
    if name == "bf16-true":
        return Precision(name, torch.bfloat16, torch.bfloat16)
    raise ValueError(f"unknown precision {name!r}")  # validated in config


def weights_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point weight."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def precision_of(model: torch.nn.Module, name: str) -> Precision:
    """The precision of an already loaded model: ``auto`` follows its weights (float16 weights
    compute in float16, without autocast)."""
    dtype = weights_dtype(model)
    if name == "auto":
        if dtype == torch.float16:
            return Precision("fp16", dtype, None)
        name = "fp32" if dtype == torch.float32 else "bf16-true"
    return resolve_precision(name, dtype)


def lost_update_fraction(model: torch.nn.Module, lr: float, sample: int = 4096) -> float:
    """The share of trainable half-precision weights for which a step of ``lr`` is below half their
    spacing (so rounds away). Up to ``sample`` elements of each weight, evenly strided."""
    lost = total = 0
    for p in model.parameters():
        if not (p.requires_grad and p.dtype in HALF and p.numel()):
            continue
        flat = p.detach().reshape(-1)
        x = flat[:: max(1, flat.numel() // sample)].float().abs()
        spacing = torch.finfo(p.dtype).eps * torch.exp2(torch.floor(torch.log2(x.clamp(min=1e-30))))
        lost += int((lr < spacing / 2).sum())
        total += x.numel()
    return lost / total if total else 0.0


def check_updates_survive(model: torch.nn.Module, optim: OptimConfig, stage: str) -> None:
    """Refuse half-precision weights stepped by plain AdamW at a learning rate they cannot represent
    (more than half of the weights would not move)."""
    if optim.name != "adamw":
        return
    lost = lost_update_fraction(model, optim.lr)
    if lost > 0.5:
        raise ConfigError(
            f"{stage}: a step of {stage}.optim.lr {optim.lr:g} is below half the bf16 spacing of "
            f"{lost:.0%} of the trained weights, so plain AdamW on bf16 weights would leave them "
            f"unchanged. Use {stage}.train.precision: bf16-mixed (float32 master weights, the default), "
            f"or keep bf16 weights with {stage}.optim.name: adamw_sr (stochastic rounding)"
        )
