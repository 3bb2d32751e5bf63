"""The one training loop: ``train()`` calls ``train_step()``, which calls ``forward_backward()``.

Loss is normalised by the loss units (tokens or pairs) of the whole optimizer step, so 8 micro-
batches of 1 give the same update as 1 batch of 8. The loss and gradient norm are checked for being
finite before the optimizer steps: a step that is not either stops the run (naming its rows) or,
with ``on_nonfinite: skip``, is dropped. Every stateful part (model, optimizer, data order, RNG,
step) saves and loads its state; with a checkpointer the state is written every N steps, at the
end, and when SIGINT or SIGTERM asks the run to stop.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import random
import signal
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from criteriapo import faults
from criteriapo.config import OptimConfig, TrainConfig
from criteriapo.distributed import SINGLE, World, all_sum, reshard
from criteriapo.errors import ConfigError, CriteriaPOError, Interrupted
from criteriapo.tracking.loggers import Loggers
from criteriapo.train.allocator import keep_freed_memory
from criteriapo.train.batching import DataOrder
from criteriapo.train.checkpoint import Checkpointer
from criteriapo.train.optim import BackwardAdamW, build_optimizer, lr_at
from criteriapo.train.precision import Precision, precision_of
from criteriapo.train.tasks import Metrics, Task

log = logging.getLogger(__name__)


def _libc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library the interpreter runs on
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc_trim()


def _return_memory_in_backward(model: torch.nn.Module, trainer: weakref.ref) -> None:
    """Also give free pages back within each backward (when the trainer returns memory): as soon as
    the output layer's backward is done (the gradient of the last trainable parameter in the model's
    order, the final norm's weight or an untied output layer's, is complete then), and then each
    quarter of the way back through the parameters. What backward freed so far would otherwise still
    count, with every gradient, at the end of backward where the step's memory peaks (on the embedded
    model, 4 pairs of 200 tokens per sequence, the peak over 5 steps: 2.73 to 2.89 GiB against 3.02
    with returns after each step only; benchmarks/return_memory.py). Each hook is the parameter's
    own, reading the newest trainer of it."""
    trained = [p for p in model.parameters() if p.requires_grad]
    if not trained:
        return
    quarters = {len(trained) * k // RETURNS for k in range(1, RETURNS)}
    for param in (trained[i] for i in quarters | {len(trained) - 1}):
        if not hasattr(param, _TRAINER):
            param.register_post_accumulate_grad_hook(_return_if_asked)
        setattr(param, _TRAINER, trainer)


RETURNS = 4  # returns of free memory within a backward
_TRAINER = "_criteriapo_trainer"  # the attribute of the hooked parameter: a weak reference to its trainer


def _return_if_asked(param: torch.Tensor) -> None:
    trainer = getattr(param, _TRAINER)()
    if trainer is not None and trainer.return_memory:
        _return_free_memory(param.device)


def _return_free_memory(device: torch.device) -> None:
    """glibc's allocator keeps freed blocks (the step's activations and gradients) mapped, so a CPU
    run's resident memory creeps up to a fragmented high-water mark; give the free pages back to the
    system (milliseconds, but the next step faults them in again)."""
    if device.type == "cpu" and _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class NonFiniteError(CriteriaPOError):
    """The loss or the gradient norm is NaN or infinite."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # non-padding tokens seen
    examples: int = 0
    skipped: int = 0  # steps dropped for a non-finite loss or gradient (on_nonfinite: skip)


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
        checkpointer: Checkpointer | None = None,
        extra_state: dict[str, torch.Tensor] | None = None,
        world: World = SINGLE,
        precision: Precision | None = None,
    ):
        self.model, self.task, self.train_set, self.eval_set = model, task, train_set, eval_set
        self.eval_task = eval_task or task
        self.optim_cfg, self.cfg, self.loggers, self.progress = optim, train, loggers, progress
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            keep_freed_memory()
        self.world = world
        # resolved by the caller from train.precision and model.dtype; else from the loaded weights
        self.precision = precision or precision_of(model, train.precision)
        # Measured on the embedded model: returning freed memory after each step lowers the lean
        # settings' peak by 0.4 GiB at no cost, but costs a step without checkpointing 10-15% in
        # page faults for no lower peak; so by default only the settings that put memory first do it
        # (after each step, and within backward: see _return_memory_in_backward).
        self.return_memory = train.return_memory
        if self.return_memory is None:
            self.return_memory = train.gradient_checkpointing or train.optimizer_in_backward
        if self.device.type == "cpu":
            _return_memory_in_backward(model, weakref.ref(self))
        lengths = [task.length(e) for e in train_set] if train.group_by_length else None
        self.order = DataOrder(len(train_set), train.seed, lengths, train.batch_size, self._units(train))
        # several processes split each step's batch equally, so an epoch's short last batch is dropped
        per_epoch = len(train_set) / train.batch_size
        self.steps_per_epoch = math.floor(per_epoch) if world.distributed else math.ceil(per_epoch)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(train_set)} examples make no full batch of {train.batch_size}")
        total = train.epochs * self.steps_per_epoch
        self.total_steps = min(total, train.max_steps) if train.max_steps else total
        reshard(model)  # the optimizer must hold the sharded parameters
        if train.optimizer_in_backward and world.distributed:
            raise ConfigError(
                "train.optimizer_in_backward works in one process: FSDP2 sets each gradient after "
                "its reduce-scatter, outside the hook that steps it. Set it to false under torchrun"
            )
        self.optimizer = build_optimizer(model, optim, train.optimizer_in_backward)
        # torchao's optimizers keep lr as a tensor, and a checkpoint (any layout) restores a number
        self._tensor_lr = any(isinstance(g["lr"], torch.Tensor) for g in self.optimizer.param_groups)
        self.state = TrainState()
        self.last_metrics: dict[str, float] = {}
        self.eval_scores: Any = None  # the last evaluation's scores of the eval examples (task.evaluate)
        self.checkpointer, self.extra_state = checkpointer, extra_state or {}
        self.last_checkpoint: Path | None = None
        self._stop_signal: str | None = None

    def _units(self, train: TrainConfig) -> list[list[int]] | None:
        """Examples the task computes together in one batch (a prompt's pairs), with train.share_prompts."""
        if not train.share_prompts:
            return None
        units: dict[Any, list[int]] = {}
        for i, e in enumerate(self.train_set):
            key = self.task.group(e)
            units.setdefault(("single", i) if key is None else ("group", key), []).append(i)
        return list(units.values())

    # -- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        self.model.train()
        if self.progress is not None:
            self.progress.start(self.total_steps, self.state.step)
        with self._stop_requests():
            while self.state.step < self.total_steps:
                metrics = self.train_step(self.order.next_batch(self.cfg.batch_size, self.world.distributed))
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
                faults.point("step")
                if self.checkpointer is not None and self.checkpointer.due(step, self.total_steps):
                    self.save_checkpoint()
                if self._stop_requested():
                    self._interrupted()
        if isinstance(self.optimizer, BackwardAdamW):
            self.optimizer.close()
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
        step = self.state.step
        lr = lr_at(step, self.optim_cfg, self.total_steps)
        for group in self.optimizer.param_groups:  # set before backward, where BackwardAdamW steps
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = torch.tensor(lr) if self._tensor_lr else lr
        loss_total, sums, tokens = self.accumulate_gradients(indices)
        grad_norm = self._clip()
        if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return self._non_finite(indices, loss_total, grad_norm, tokens, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.return_memory:
            _return_free_memory(self.device)
        self.state = TrainState(
            step + 1, self.state.tokens + tokens, self.state.examples + len(indices), self.state.skipped
        )
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

    def _non_finite(self, indices: list[int], loss: float, grad_norm: float, tokens: int, lr: float) -> dict:
        """Stop, or with ``on_nonfinite: skip`` drop the step (no update) and go on."""
        step = self.state.step + 1
        rows = "; ".join(str(getattr(self.train_set[i], "source", i)) for i in sorted(indices)[:8])
        rows += " ..." if len(indices) > 8 else ""
        what = f"step {step}: loss {loss} and gradient norm {grad_norm}; the step's rows: {rows}"
        if self.cfg.on_nonfinite == "stop":
            where = f" The last checkpoint is {self.last_checkpoint}." if self.last_checkpoint else ""
            updated = (
                "The weights in memory were updated in backward (train.optimizer_in_backward) and are "
                "not saved."
                if isinstance(self.optimizer, BackwardAdamW)
                else "Nothing was updated."
            )
            raise NonFiniteError(
                f"{what}. {updated}{where} Lower the learning rate, check those rows, or set "
                "train.on_nonfinite: skip to drop such steps"
            )
        log.warning("%s. Skipped: the optimizer did not step", what)
        s = self.state
        self.state = TrainState(step, s.tokens + tokens, s.examples + len(indices), s.skipped + 1)
        self.last_metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": lr,
            "epoch": self.state.examples / len(self.train_set),
            "skipped_steps": float(self.state.skipped),
            "num_tokens": float(self.state.tokens),
        }
        return dict(self.last_metrics)

    def accumulate_gradients(self, indices: list[int]) -> tuple[float, dict[str, tuple[float, float]], int]:
        """Forward and backward every micro-batch of one optimizer step; gradients add up to those of
        the whole batch. Returns the step's loss, metric sums and non-padding token count."""
        mbs, w = self.cfg.micro_batch_size, self.world
        mine = indices[w.rank :: w.size]  # this process's share of the global batch
        batches = [self._collate(mine[i : i + mbs]) for i in range(0, len(mine), mbs)]
        totals = _totals(self.task, batches, self.model, self._autocast)
        if w.distributed:  # the loss's denominators are those of the whole step, on every process
            keys = sorted(totals)
            summed = all_sum([float(totals[k]) for k in keys], w)
            totals = {k: type(totals[k])(v) for k, v in zip(keys, summed, strict=True)}
        loss_total, sums = 0.0, {}
        for b in batches:
            loss, metrics = self.forward_backward(b, totals)
            loss_total += loss
            _accumulate(sums, metrics)
        tokens = sum(int(b["tokens"]) for b in batches)
        if w.distributed:
            keys = sorted(sums)
            flat = all_sum([loss_total, float(tokens), *(x for k in keys for x in sums[k])], w)
            loss_total, tokens = flat[0], int(flat[1])
            sums = {k: (flat[2 + 2 * i], flat[3 + 2 * i]) for i, k in enumerate(keys)}
        return loss_total, sums, tokens

    def forward_backward(
        self, batch: dict[str, torch.Tensor], totals: dict[str, int]
    ) -> tuple[float, Metrics]:
        with self._autocast():
            loss, metrics = self.task.loss(self.model, batch, totals)
        # FSDP2 averages gradients over processes; each loss is already a share of the global one
        (loss * self.world.size if self.world.distributed else loss).backward()
        return float(loss.detach()), metrics

    def _autocast(self):
        return self.precision.context(self.device)

    def _collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = self.task.collate([self.train_set[i] for i in indices], indices)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _clip(self) -> float:
        if isinstance(self.optimizer, BackwardAdamW):  # stepped in backward, unclipped
            return self.optimizer.grad_norm()
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.optim_cfg.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's loss and metrics over the whole eval set, prefixed ``eval/``. A task with
        ``evaluate`` also scores each example: kept, in example order, as ``eval_scores``."""
        self.model.eval()
        mbs = self.cfg.micro_batch_size
        task = self.eval_task
        batches = [
            task.collate(self.eval_set[i : i + mbs], range(i, min(i + mbs, len(self.eval_set))))
            for i in range(0, len(self.eval_set), mbs)
        ]
        batches = [{k: v.to(self.device) for k, v in b.items()} for b in batches]
        totals = _totals(task, batches, self.model, self._autocast)
        scoring = getattr(task, "evaluate", None)
        loss_total, sums, scores = 0.0, {}, []
        for b in batches:
            with self._autocast():
                if scoring is None:
                    loss, metrics = task.loss(self.model, b, totals)
                else:
                    loss, metrics, batch_scores = scoring(self.model, b, totals)
                    scores.append((b["index"], batch_scores))
            loss_total += float(loss)
            _accumulate(sums, metrics)
        if scores:
            self.eval_scores = type(scores[0][1]).in_order(scores)
        self.model.train()
        reshard(self.model)
        return {"eval/loss": loss_total, **{f"eval/{k}": s / c for k, (s, c) in sums.items() if c}}

    # -- checkpoints and stopping -----------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of this step (once per step)."""
        if self.checkpointer is None:
            return None
        if self.last_checkpoint is None or self.last_checkpoint.name != f"step-{self.state.step:08d}":
            self.last_checkpoint = self.checkpointer.save(self, self._extra_state())
        return self.last_checkpoint

    def _extra_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps beyond the trainer's own state: the stage's ``extra_state`` and
        what each task holds (``state()``: its precomputed reference), under ``task.``/``eval_task.``."""
        out = dict(self.extra_state)
        for name, task in (("task", self.task), ("eval_task", self.eval_task)):
            state = getattr(task, "state", None)
            if state is not None and (name == "task" or task is not self.task):
                out.update({f"{name}.{k}": v for k, v in state().items()})
        return out

    @contextlib.contextmanager
    def _stop_requests(self) -> Iterator[None]:
        """While training, SIGINT and SIGTERM ask for a stop after the current step; a second one of
        the same kind acts at once, as it would have without us."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous: dict[int, Any] = {}

        def request(signum: int, _frame: Any) -> None:
            self._stop_signal = signal.Signals(signum).name
            signal.signal(signum, previous[signum])
            log.warning("%s: stopping after this step", self._stop_signal)

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, request)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop_requested(self) -> bool:
        """Whether any process was asked to stop: all of them stop after the same step."""
        if not self.world.distributed:
            return self._stop_signal is not None
        if all_sum([float(self._stop_signal is not None)], self.world)[0] and self._stop_signal is None:
            self._stop_signal = "a signal to another process"
        return self._stop_signal is not None

    def _interrupted(self) -> None:
        path = self.save_checkpoint()
        if self.progress is not None:
            self.progress.stop()
        self.loggers.close()
        done = f"stopped by {self._stop_signal} after step {self.state.step} of {self.total_steps}"
        if path is None:
            raise Interrupted(f"{done}; this run has no checkpointer, so nothing was saved")
        raise Interrupted(
            f"{done}; checkpoint written to {path}. Run the same command with --resume to go on"
        )

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self, model: bool = True, optimizer: bool = True) -> dict[str, Any]:
        return {
            **({"model": self.model.state_dict()} if model else {}),
            **({"optimizer": self.optimizer.state_dict()} if optimizer else {}),
            "train_state": asdict(self.state),
            "data_order": self.order.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }

    def load_state_dict(self, state: dict[str, Any], model: bool = True) -> None:
        if model:
            self.model.load_state_dict(state["model"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.state = TrainState(**state["train_state"])
        self.order.load_state_dict(state["data_order"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def _totals(task: Task, batches: list[dict[str, torch.Tensor]], model=None, compute=None) -> dict[str, float]:
    """Loss units (tokens, pairs) of all micro-batches of a step: the loss's denominators; and for a
    task with ``step_sums`` (KTO's KL estimate), those sums, computed without gradient first."""
    totals: dict[str, float] = {}
    for b in batches:
        for k, v in task.counts(b).items():
            totals[k] = totals.get(k, 0) + v
    step_sums = getattr(task, "step_sums", None)
    if step_sums is not None and model is not None:
        for b in batches:
            with compute():
                for k, v in step_sums(model, b).items():
                    totals[k] = totals.get(k, 0.0) + v
    return totals


def _accumulate(sums: dict[str, tuple[float, float]], metrics: Metrics) -> None:
    for k, (s, c) in metrics.items():
        s0, c0 = sums.get(k, (0.0, 0.0))
        sums[k] = (s0 + s, c0 + c)
