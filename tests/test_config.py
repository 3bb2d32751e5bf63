"""Typed config: YAML, dotted overrides, and a clear message for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from criteriapo.config import load_config
from criteriapo.errors import ConfigError
from criteriapo.pipeline import check_choices


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(
        tmp_path, "output_dir: runs/x\ndpo:\n  beta: 0.2\n  optim: {lr: 1e-6}\n  data: {train: a.jsonl}\n"
    )
    cfg = load_config(path, ["dpo.loss_type=ipo", "sft.train.batch_size=16", "model.name_or_path=/m"])
    assert (cfg.output_dir, cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.optim.lr) == ("runs/x", 0.2, "ipo", 1e-6)
    assert (
        cfg.dpo.data.train == ["a.jsonl"]
        and cfg.sft.train.batch_size == 16
        and cfg.model.name_or_path == "/m"
    )
    assert cfg.sft.optim.lr == 2e-5  # stage defaults survive a partial section


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("dpo:\n  betta: 0.1\n", [], "dpo.betta: unknown key; did you mean 'beta'?"),
        ("", ["sft.train.epochs=two"], "sft.train.epochs: expected an integer, got 'two'"),
        ("", ["tracking.wandb=maybe"], "tracking.wandb: expected true or false, got 'maybe'"),
        ("", ["dpo.beta=-0.1"], "dpo.beta must be > 0, got -0.1"),
        (
            "",
            ["dpo.loss_type=sigmoidd"],
            "dpo.loss_type: unknown loss 'sigmoidd'; choose one of sigmoid, robust",
        ),
        (
            "",
            ["dpo.data.max_length=128", "dpo.data.max_prompt_length=128"],
            "dpo.data.max_prompt_length (128) must be below max_length (128)",
        ),
        ("", ["sft.data.on_bad_row=drop"], "sft.data.on_bad_row: must be one of 'error', 'skip', got 'drop'"),
        (
            "",
            ["sft.train.batch_size=6", "sft.train.micro_batch_size=4"],
            "batch_size (6) must be a multiple of",
        ),
        ("", ["dpo.label_smoothing=0.5"], "dpo.label_smoothing must be in [0, 0.5)"),
        ("", ["dpo.optim.betas=[0.9]"], "dpo.optim.betas: expected 2 values, got 1"),
        ("", ["model.dtype=fp8"], "model.dtype: must be one of 'auto', 'float32', 'bfloat16', 'float16'"),
        ("", ["beta"], "override 'beta': expected key=value"),
        ("- a\n- b\n", [], "expected a mapping of sections at the top"),
        ("dpo: [1\n", [], "not valid YAML"),
    ],
)
def test_mistakes_are_named(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError) as e:
        check_choices(load_config(write(tmp_path, text), overrides))
    assert message in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("dpo.optim.lr=.inf", "dpo.optim.lr: expected a finite number, got inf"),
        ("dpo.beta=.nan", "dpo.beta: expected a finite number"),
        ("sft.optim.eps=0", "sft.optim.eps must be > 0"),
        ("sft.optim.warmup_steps=-5", "sft.optim.warmup_steps must be >= 0"),
        ("dpo.train.seed=99999999999999", "dpo.train.seed must be in [0, 2**32)"),
        ("dpo.mini_min_margin=-3", "dpo.mini_min_margin must be >= 0"),
        ("dpo.criterion_weights={brevity: -1}", "dpo.criterion_weights.brevity must be >= 0"),
        ("dpo.recipe=best", "dpo.recipe: "),
        ("dpo.criteria_data.samples=0", "dpo.criteria_data.samples must be >= 1, got 0"),
        ("dpo.criteria_data.held_out=1", "dpo.criteria_data.held_out must be in (0, 1), got 1"),
        ("dpo.criteria_data.prompts=2", "held_out 0.2 of 2 prompts leaves no train or no held-out prompt"),
        ("dpo.criteria_data.top_p=0", "dpo.criteria_data.top_p must be in (0, 1], got 0"),
        ("dpo.criteria_data.temperature=-1", "dpo.criteria_data.temperature must be >= 0, got -1"),
        ("dpo.criteria_data.decoys=2", "dpo.criteria_data.decoys is a share of prompts, in [0, 1]; got 2"),
        (
            "sft.train={gradient_checkpointing: false, keep_projections: true}",
            "gradient_checkpointing is false",
        ),
    ],
)
def test_values_that_would_break_later_are_refused_now(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*3b*.yaml")), ids=lambda p: p.name)
def test_the_3b_configs_train_weights_that_move(path):
    """bf16 weights stepped by plain AdamW at DPO's 5e-7 barely move: every trained weight of the
    3B configs is float32 under bf16 autocast (LoRA: the adapters; the frozen base stays bf16), or
    bf16 stepped with stochastic rounding (the 24 GB config)."""
    import torch

    from criteriapo.train.precision import resolve_precision

    cfg = load_config(path)
    assert cfg.model.dtype == "bfloat16"
    for stage in (cfg.sft, cfg.dpo):
        p = resolve_precision(stage.train.precision, torch.bfloat16, stage.lora.enabled)
        assert p.autocast == torch.bfloat16
        if stage.train.precision == "bf16-true":
            assert p.weights == torch.bfloat16 and stage.optim.name == "adamw_sr"
            continue
        assert p.weights == (torch.bfloat16 if stage.lora.enabled else torch.float32)
        assert stage.optim.name == "adamw"


def test_an_empty_config_file_takes_the_defaults_with_a_warning(tmp_path, caplog):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set yet\n")
    with caplog.at_level("WARNING"):
        cfg = load_config(path)
    assert f"{path} is empty: every setting takes its default" in caplog.text
    assert cfg.dpo.beta == load_config().dpo.beta


def test_fields_free_to_change_on_resume_are_declared_where_they_are():
    from criteriapo.config import resume_free_keys
    from criteriapo.resume import FREE_KEYS

    keys = resume_free_keys()
    assert FREE_KEYS == keys
    assert {
        "model.device",
        "sft.train.log_every",
        "dpo.train.checkpoint_every",
        "dpo.train.on_nonfinite",
    } <= set(keys)
    assert not {k for k in keys if k.endswith((".seed", ".lr", ".batch_size", ".epochs", "name_or_path"))}
