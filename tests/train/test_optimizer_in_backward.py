"""Stepping each weight inside backward gives the updates of the normal step, holds no gradient,
checkpoints and resumes exactly, and is refused where it cannot work."""

from __future__ import annotations

import pytest
import torch

from criteriapo.config import DPOConfig, OptimConfig, TrainConfig, load_config
from criteriapo.distributed import World
from criteriapo.errors import ConfigError
from criteriapo.models.training import enable_activation_checkpointing
from criteriapo.tracking.loggers import Loggers
from criteriapo.train.checkpoint import Checkpointer
from criteriapo.train.loop import Trainer
from criteriapo.train.optim import BackwardAdamW
from criteriapo.train.scores import score_pairs
from criteriapo.train.tasks import DPOTask, SFTTask
from tests.train.test_loop import PAD, tiny_model, toy_pairs, toy_sft

RUN = {"config": {}, "data": "abc", "examples": 16}


def trainer(in_backward: bool, task: str = "dpo", gradient_checkpointing: bool = False) -> Trainer:
    model = tiny_model()
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    if task == "dpo":
        data = toy_pairs(16)
        job = DPOTask(DPOConfig(), PAD, 64, reference=score_pairs(model, data, PAD))
    else:
        data, job = toy_sft(16), SFTTask(PAD)
    train = TrainConfig(batch_size=8, optimizer_in_backward=in_backward, epochs=2)
    optim = OptimConfig(lr=1e-3, weight_decay=0.1, max_grad_norm=None, warmup_steps=2)
    t = Trainer(model, job, data, optim, train, Loggers([]))
    t.model.train()
    return t


@pytest.mark.parametrize("task", ["dpo", "sft"])
@pytest.mark.parametrize("gc", [False, True], ids=["plain", "checkpointed"])
def test_same_updates_as_the_normal_step(task, gc):
    normal, inside = trainer(False, task, gc), trainer(True, task, gc)
    assert isinstance(inside.optimizer, BackwardAdamW)
    for _ in range(3):  # through the warm-up: the learning rate must be set before backward
        batch = normal.order.next_batch(8)
        assert inside.order.next_batch(8) == batch
        a, b = normal.train_step(batch), inside.train_step(batch)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert all(p.grad is None for p in inside.model.parameters())  # freed in backward
    for (name, p), q in zip(normal.model.named_parameters(), inside.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_checkpoint_resumes_bit_identically(tmp_path):
    straight = trainer(True)
    straight.checkpointer = Checkpointer(tmp_path, RUN, every=1, keep=2)
    for _ in range(2):
        straight.train_step(straight.order.next_batch(8))
        straight.save_checkpoint()
    resumed = trainer(True)
    resumed.checkpointer = Checkpointer(tmp_path, RUN, every=1, keep=2)
    resumed.checkpointer.restore(resumed, resumed.checkpointer.latest())
    a, b = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for _ in range(2):
        assert (
            straight.train_step(straight.order.next_batch(8))["loss"]
            == resumed.train_step(resumed.order.next_batch(8))["loss"]
        )
    for p, q in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["dpo.train.micro_batch_size=2"], "micro_batch_size equal to batch_size"),
        (["dpo.optim.max_grad_norm=1.0"], "max_grad_norm: null"),
        (["dpo.train.on_nonfinite=skip"], "on_nonfinite: stop"),
    ],
)
def test_config_refuses_what_cannot_work(overrides, says):
    base = ["dpo.train.optimizer_in_backward=true", "dpo.optim.max_grad_norm=null"]
    load_config(None, base)  # valid as it is
    with pytest.raises(ConfigError, match=says):
        load_config(None, base + overrides)


def test_refused_under_several_processes():
    model = tiny_model()
    data = toy_sft(4)
    with pytest.raises(ConfigError, match="one process"):
        Trainer(
            model,
            SFTTask(PAD),
            data,
            OptimConfig(max_grad_norm=None),
            TrainConfig(batch_size=4, optimizer_in_backward=True),
            Loggers([]),
            world=World(rank=0, size=2, local_rank=0),
        )


def test_a_second_optimizer_on_the_same_model_and_closing():
    t = trainer(True)
    again = BackwardAdamW(
        [{"params": list(t.model.parameters()), "weight_decay": 0.0}],
        lambda params, weight_decay: torch.optim.AdamW(params, lr=1e-3, weight_decay=weight_decay),
    )
    t.train_step(t.order.next_batch(8))  # both hooks fire; the second finds the gradient gone
    assert all(p.grad is None for p in t.model.parameters())
    t.optimizer.close()
    again.close()
    batch = t._collate(t.order.next_batch(8))
    t.task.loss(t.model, batch, t.task.counts(batch))[0].backward()
    assert all(p.grad is not None for p in t.model.parameters())  # no hook stepped or freed them
