"""Precision that trains: 50 steps at DPO's learning rate of 5e-7 move the weights as float32 does in
every supported setting, and the setting that would not (bf16 weights, plain AdamW) is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from criteriapo.config import OptimConfig, TrainConfig, load_config
from criteriapo.errors import ConfigError
from criteriapo.tracking.loggers import Loggers
from criteriapo.train.loop import Trainer
from criteriapo.train.precision import check_updates_survive, lost_update_fraction, resolve_precision
from criteriapo.train.tasks import SFTTask
from tests.train.test_loop import tiny_model, toy_sft

LR, STEPS = 5e-7, 50


def model(dtype: torch.dtype) -> LlamaForCausalLM:
    return tiny_model(0, hidden=64).to(dtype)


def applied_update(precision: str, optimizer: str = "adamw", in_backward: bool = False) -> torch.Tensor:
    """Every weight's change after 50 steps, as float32."""
    prec = resolve_precision(precision, torch.float32)
    m = model(prec.weights)
    before = torch.cat([p.detach().float().flatten() for p in m.parameters()])
    optim = OptimConfig(
        lr=LR, scheduler="constant", name=optimizer, **({"max_grad_norm": None} if in_backward else {})
    )
    data = toy_sft(8)
    t = Trainer(
        m,
        SFTTask(0),
        data,
        optim,
        TrainConfig(batch_size=8, precision=precision, optimizer_in_backward=in_backward),
        Loggers([]),
        precision=prec,
    )
    for _ in range(STEPS):
        t.train_step(list(range(8)))
    return torch.cat([p.detach().float().flatten() for p in m.parameters()]) - before


@pytest.fixture(scope="module")
def fp32_update() -> torch.Tensor:
    return applied_update("fp32")


def projection(update: torch.Tensor, reference: torch.Tensor) -> float:
    """How much of the float32 update was applied (1: all of it, on average over the weights)."""
    return float(update @ reference / (reference @ reference))


def test_bf16_mixed_applies_the_float32_update(fp32_update):
    mixed = applied_update("bf16-mixed")
    cos = float(torch.nn.functional.cosine_similarity(mixed, fp32_update, dim=0))
    print(f"\nbf16-mixed: {projection(mixed, fp32_update):.3f} of the fp32 update applied, cosine {cos:.3f}")
    assert projection(mixed, fp32_update) == pytest.approx(1.0, abs=0.05)
    assert torch.nn.functional.cosine_similarity(mixed, fp32_update, dim=0) > 0.98


def test_bf16_weights_with_stochastic_rounding_apply_it_on_average(fp32_update):
    sr = applied_update("bf16-true", "adamw_sr")  # unbiased: each weight's update is noisy
    print(f"\nbf16-true + adamw_sr: {projection(sr, fp32_update):.3f} of the fp32 update applied")
    assert projection(sr, fp32_update) == pytest.approx(1.0, abs=0.15)


def test_stochastic_rounding_stepped_in_backward_applies_it_too(fp32_update):
    """The least-memory setting for a 3B model on one 24 GB GPU: bf16 weights, torchao's AdamW with
    stochastic rounding, each weight stepped in backward (no gradient held)."""
    sr = applied_update("bf16-true", "adamw_sr", in_backward=True)
    print(f"\nbf16-true + adamw_sr in backward: {projection(sr, fp32_update):.3f} of the fp32 update applied")
    assert projection(sr, fp32_update) == pytest.approx(1.0, abs=0.15)


def test_bf16_weights_with_plain_adamw_lose_the_update_and_are_refused(fp32_update):
    lost = applied_update("bf16-true")
    print(f"\nbf16-true + adamw: {projection(lost, fp32_update):.3f} of the fp32 update applied")
    assert projection(lost, fp32_update) < 0.1  # what the seed's 3B configs trained: almost nothing
    m = model(torch.bfloat16)
    assert lost_update_fraction(m, LR) > 0.9
    with pytest.raises(ConfigError, match="dpo.train.precision: bf16-mixed"):
        check_updates_survive(m, OptimConfig(lr=LR), "dpo")
    check_updates_survive(m, OptimConfig(lr=LR, name="adamw_sr"), "dpo")  # rounds stochastically
    check_updates_survive(m, OptimConfig(lr=1e-2), "dpo")  # a step bf16 can represent
    check_updates_survive(model(torch.float32), OptimConfig(lr=LR), "dpo")


def test_auto_is_bf16_mixed_for_half_model_dtypes():
    assert resolve_precision("auto", torch.bfloat16).name == "bf16-mixed"
    assert resolve_precision("auto", torch.bfloat16).weights == torch.float32  # master weights
    assert resolve_precision("auto", torch.bfloat16, lora=True).weights == torch.bfloat16  # frozen base
    assert resolve_precision("auto", torch.float32).name == "fp32"


def test_config_names_the_precision_settings():
    with pytest.raises(ConfigError, match="renamed; use precision: bf16-mixed"):
        load_config(None, ["dpo.train.mixed_precision=bf16"])
    with pytest.raises(ConfigError, match="adamw_sr rounds bf16 weights"):
        load_config(None, ["dpo.optim.name=adamw_sr"])
    cfg = load_config(None, ["dpo.optim.name=adamw_sr", "dpo.train.precision=bf16-true"])
    assert cfg.dpo.train.precision == "bf16-true"


def test_a_restored_number_lr_does_not_stop_torchaos_optimizer():
    """FSDP2's sharded restore puts the checkpoint's number back where torchao keeps a tensor."""
    prec = resolve_precision("bf16-true", torch.float32)
    optim = OptimConfig(lr=LR, scheduler="constant", name="adamw_sr")
    train = TrainConfig(batch_size=8, precision="bf16-true")
    t = Trainer(model(torch.bfloat16), SFTTask(0), toy_sft(8), optim, train, Loggers([]), precision=prec)
    t.train_step(list(range(8)))
    for group in t.optimizer.param_groups:
        group["lr"] = float(group["lr"])  # as Optimizer.load_state_dict leaves it
    t.train_step(list(range(8)))
    assert all(isinstance(g["lr"], torch.Tensor) for g in t.optimizer.param_groups)
