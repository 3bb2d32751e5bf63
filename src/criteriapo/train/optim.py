"""AdamW with decoupled weight decay off for biases and norms, and the learning-rate schedule.

With ``train.optimizer_in_backward`` each parameter is stepped inside backward as soon as its
gradient is complete, and the gradient is freed at once: the model's worth of gradient memory that
a normal step holds until ``optimizer.step()`` is never held.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from criteriapo.config import OptimConfig


def _groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _fused(params: list[torch.Tensor]) -> bool | None:
    """The fused kernel (one pass, no temporaries) on CPU and GPU; not for FSDP2's sharded tensors."""
    from torch.distributed.tensor import DTensor

    plain = not any(isinstance(p, DTensor) for p in params)
    return True if plain and all(p.device.type in ("cpu", "cuda") for p in params) else None


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, in_backward: bool = False):
    groups = _groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    fused = _fused(params)

    def adamw(group_params: list, weight_decay: float | None = None) -> torch.optim.Optimizer:
        kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": cfg.betas, "eps": cfg.eps}
        if weight_decay is not None:
            kwargs["weight_decay"] = weight_decay
        if cfg.name == "adamw_sr":
            # torchao's AdamW: bf16 weights and states, each update rounded stochastically so that steps
            # far below bf16's spacing still move the weights on average (its step is torch.compile'd)
            from torchao.optim import _AdamW

            return _AdamW(group_params, **kwargs, bf16_stochastic_round=True)
        return torch.optim.AdamW(group_params, **kwargs, fused=fused)

    if in_backward:
        return BackwardAdamW(groups, adamw)
    return adamw(groups)


class BackwardAdamW:
    """AdamW stepped per parameter from a hook that runs when the parameter's gradient is complete
    (torch's, or torchao's with stochastic rounding for bf16 weights: ``make`` builds one per weight).

    A step is then one micro-batch, and the gradient is not clipped by the global norm, which is not
    known until every gradient is done (the config refuses both). The squared norm is summed as the
    hooks run, for the ``grad_norm`` metric and the finite check. ``state_dict`` has the layout of
    one AdamW over the same groups, so checkpoints are written and read as for the normal optimizer.
    """

    def __init__(self, groups: list[dict[str, Any]], make: Callable[..., torch.optim.Optimizer]):
        self._one: dict[torch.Tensor, tuple[torch.optim.Optimizer, dict[str, Any]]] = {}
        self._handles = []
        self.param_groups = []
        for g in groups:
            group = dict(g)
            for p in g["params"]:
                opt = make([p], g["weight_decay"])
                group["lr"] = opt.param_groups[0]["lr"]
                self._one[p] = (opt, group)
                self._handles.append(p.register_post_accumulate_grad_hook(self._step_one))
            self.param_groups.append(group)
        self._squares: torch.Tensor | None = None

    def _step_one(self, p: torch.Tensor) -> None:
        if p.grad is None:  # already stepped by another hook on the same weight
            return
        opt, group = self._one[p]
        sq = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32).square()  # no float copy
        self._squares = sq if self._squares is None else self._squares + sq
        opt.param_groups[0]["lr"] = group["lr"]
        opt.step()
        p.grad = None

    def grad_norm(self) -> float:
        """The norm of the gradients stepped since the last call (all of one step's)."""
        squares, self._squares = self._squares, None
        return math.sqrt(float(squares)) if squares is not None else 0.0

    def close(self) -> None:
        """Remove the hooks: backward through the model no longer steps it."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def step(self) -> None:
        """Nothing left to do: every parameter was stepped in backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._one:
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        state, groups, i = {}, [], 0
        for g in self.param_groups:
            ids = []
            for p in g["params"]:
                if p in self._one[p][0].state:
                    state[i] = self._one[p][0].state[p]
                ids.append(i)
                i += 1
            settings = self._one[g["params"][0]][0].param_groups[0] if g["params"] else {}
            settings = {k: v for k, v in settings.items() if k != "params"}  # betas, eps, ...
            groups.append({**settings, **{k: v for k, v in g.items() if k != "params"}, "params": ids})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        flat = [p for g in self.param_groups for p in g["params"]]
        if len(flat) != sum(len(g["params"]) for g in sd["param_groups"]):
            raise ValueError("the optimizer state is for a different set of parameters")
        for g, saved in zip(self.param_groups, sd["param_groups"], strict=True):
            g["lr"] = saved["lr"]
        for i, p in enumerate(flat):
            opt = self._one[p][0]
            group = {**{k: v for k, v in opt.param_groups[0].items() if k != "params"}, "params": [0]}
            state = {0: sd["state"][i]} if i in sd["state"] else {}
            opt.load_state_dict({"state": state, "param_groups": [group]})


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
