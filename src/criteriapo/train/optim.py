"""AdamW with decoupled weight decay off for biases and norms, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from criteriapo.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_gpu = any(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=on_gpu or None)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else int(cfg.warmup_ratio * total_steps)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then the schedule.
    A function of the step alone, so the schedule has no state to save."""
    warm = warmup_steps(cfg, total_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.scheduler == "constant":
        return cfg.lr
    progress = (step - warm) / max(1, total_steps - warm)
    if cfg.scheduler == "linear":
        return cfg.lr * max(0.0, 1 - progress)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
