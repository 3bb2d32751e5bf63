"""The one training loop: ``train()`` calls ``train_step()``, which calls ``forward_backward()``.

Loss is normalised by the loss units (tokens or pairs) of the whole optimizer step, so 8 micro-
batches of 1 give the same update as 1 batch of 8. The loss and gradient norm are checked for being
finite before the optimizer steps. Every stateful part (model, optimizer, data order, RNG, step)
saves and loads its state.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from criteriapo.config import OptimConfig, TrainConfig
from criteriapo.errors import CriteriaPOError
from criteriapo.tracking.loggers import Loggers
from criteriapo.train.batching import DataOrder
from criteriapo.train.optim import build_optimizer, lr_at
from criteriapo.train.tasks import Metrics, Task


class NonFiniteError(CriteriaPOError):
    """The loss or the gradient norm is NaN or infinite."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # non-padding tokens seen
    examples: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        task: Task,
        train_set: Sequence[Any],
        optim: OptimConfig,
        train: TrainConfig,
        loggers: Loggers,
        eval_set: Sequence[Any] = (),
        progress: Any = None,
        eval_task: Task | None = None,
    ):
        self.model, self.task, self.train_set, self.eval_set = model, task, train_set, eval_set
        self.eval_task = eval_task or task
        self.optim_cfg, self.cfg, self.loggers, self.progress = optim, train, loggers, progress
        self.device = next(model.parameters()).device
        self.order = DataOrder(len(train_set), train.seed)
        self.steps_per_epoch = math.ceil(len(train_set) / train.batch_size)
        total = train.epochs * self.steps_per_epoch
        self.total_steps = min(total, train.max_steps) if train.max_steps else total
        self.optimizer = build_optimizer(model, optim)
        self.state = TrainState()
        self.last_metrics: dict[str, float] = {}

    # -- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        self.model.train()
        if self.progress is not None:
            self.progress.start(self.total_steps, self.state.step)
        while self.state.step < self.total_steps:
            metrics = self.train_step(self.order.next_batch(self.cfg.batch_size))
            step = self.state.step
            evaluated = (
                bool(self.cfg.eval_every) and step % self.cfg.eval_every == 0 and step < self.total_steps
            )
            if evaluated:
                metrics.update(self.evaluate())
            if evaluated or step % self.cfg.log_every == 0 or step == self.total_steps:
                self.loggers.log(step, metrics)
            if self.progress is not None:
                self.progress.update(step, metrics)
        final = dict(self.last_metrics)
        if self.eval_set:
            evaluated = self.evaluate()
            self.loggers.log(self.state.step, evaluated)
            final.update(evaluated)
        if self.progress is not None:
            self.progress.stop()
        return final

    def train_step(self, indices: list[int]) -> dict[str, float]:
        t0 = time.perf_counter()
        loss_total, sums, tokens = self.accumulate_gradients(indices)
        grad_norm = self._clip()
        step = self.state.step
        if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            rows = "; ".join(str(getattr(self.train_set[i], "source", i)) for i in sorted(indices)[:8])
            raise NonFiniteError(
                f"step {step + 1}: loss {loss_total} and gradient norm {grad_norm}; the step's rows: {rows}"
                f"{' ...' if len(indices) > 8 else ''}. Nothing was updated; lower the learning rate or "
                "check those rows"
            )
        lr = lr_at(step, self.optim_cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state = TrainState(step + 1, self.state.tokens + tokens, self.state.examples + len(indices))
        elapsed = time.perf_counter() - t0
        out = {
            "loss": loss_total,
            **{k: s / c for k, (s, c) in sums.items() if c},
            "grad_norm": grad_norm,
            "learning_rate": lr,
            "epoch": self.state.examples / len(self.train_set),
            "tokens_per_second": tokens / elapsed,
            "num_tokens": float(self.state.tokens),
        }
        self.last_metrics = out
        return out

    def accumulate_gradients(self, indices: list[int]) -> tuple[float, dict[str, tuple[float, float]], int]:
        """Forward and backward every micro-batch of one optimizer step; gradients add up to those of
        the whole batch. Returns the step's loss, metric sums and non-padding token count."""
        mbs = self.cfg.micro_batch_size
        batches = [self._collate(indices[i : i + mbs]) for i in range(0, len(indices), mbs)]
        totals = _totals(self.task, batches)
        loss_total, sums = 0.0, {}
        for b in batches:
            loss, metrics = self.forward_backward(b, totals)
            loss_total += loss
            _accumulate(sums, metrics)
        return loss_total, sums, sum(int(b["attention_mask"].sum()) for b in batches)

    def forward_backward(
        self, batch: dict[str, torch.Tensor], totals: dict[str, int]
    ) -> tuple[float, Metrics]:
        loss, metrics = self.task.loss(self.model, batch, totals)
        loss.backward()
        return float(loss.detach()), metrics

    def _collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = self.task.collate([self.train_set[i] for i in indices], indices)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.optim_cfg.max_grad_norm or float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's loss and metrics over the whole eval set, prefixed ``eval/``."""
        self.model.eval()
        mbs = self.cfg.micro_batch_size
        task = self.eval_task
        batches = [
            task.collate(self.eval_set[i : i + mbs], range(i, min(i + mbs, len(self.eval_set))))
            for i in range(0, len(self.eval_set), mbs)
        ]
        batches = [{k: v.to(self.device) for k, v in b.items()} for b in batches]
        totals = _totals(task, batches)
        loss_total, sums = 0.0, {}
        for b in batches:
            loss, metrics = task.loss(self.model, b, totals)
            loss_total += float(loss)
            _accumulate(sums, metrics)
        self.model.train()
        return {"eval/loss": loss_total, **{f"eval/{k}": s / c for k, (s, c) in sums.items() if c}}

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "train_state": asdict(self.state),
            "data_order": self.order.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.state = TrainState(**state["train_state"])
        self.order.load_state_dict(state["data_order"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def _totals(task: Task, batches: list[dict[str, torch.Tensor]]) -> dict[str, int]:
    """Loss units (tokens, pairs) of all micro-batches of a step: the loss's denominators."""
    totals: dict[str, int] = {}
    for b in batches:
        for k, v in task.counts(b).items():
            totals[k] = totals.get(k, 0) + v
    return totals


def _accumulate(sums: dict[str, tuple[float, float]], metrics: Metrics) -> None:
    for k, (s, c) in metrics.items():
        s0, c0 = sums.get(k, (0.0, 0.0))
        sums[k] = (s0 + s, c0 + c)
