"""Stages end to end on a tiny model: run folders, metrics, plots, and an exported folder that
transformers' pipeline loads and that answers a list of chat messages as the model card says."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from criteriapo.config import load_config
from criteriapo.errors import ConfigError
from criteriapo.pipeline import run_dpo, run_sft
from tests.helpers import write_criteria_data, write_jsonl

U = {"role": "user", "content": "What is the capital of France?"}


@pytest.fixture
def config(tmp_path, tiny_llama_dir):
    sft = write_jsonl(
        tmp_path / "sft.jsonl",
        [{"messages": [U, {"role": "assistant", "content": f"Paris {i}."}]} for i in range(6)],
    )
    pairs = [
        {
            "prompt": [U],
            "chosen": [{"role": "assistant", "content": f"Paris, {i}."}],
            "rejected": [{"role": "assistant", "content": f"Lyon {i}!"}],
        }
        for i in range(6)
    ]
    write_jsonl(tmp_path / "pairs.jsonl", pairs + [{"prompt": [U], "chosen": "x", "rejected": "x"}])
    return load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"model.name_or_path={tiny_llama_dir}",
            f"sft.data.train={sft}",
            f"dpo.data.train={tmp_path / 'pairs.jsonl'}",
            f"dpo.data.eval={tmp_path / 'pairs.jsonl'}",
            "dpo.data.on_bad_row=skip",
            "sft.train.batch_size=2",
            "sft.train.micro_batch_size=1",
            "dpo.train.batch_size=2",
            "dpo.train.micro_batch_size=2",
            "dpo.optim.lr=1e-3",
            "tracking.progress=false",
        ],
    )


def test_sft_then_dpo_run_folders(config):
    sft = run_sft(config)
    assert (sft.run_dir / "metrics.jsonl").exists() and (sft.run_dir / "loss.png").exists()
    dpo = run_dpo(config, model_spec=str(sft.model_dir))
    rows = [json.loads(line) for line in (dpo.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "grad_norm",
        "learning_rate",
        "epoch",
        "tokens_per_second",
    ):
        assert key in rows[0], key
    assert "eval/rewards/accuracies" in rows[-1]
    assert {p.name for p in dpo.run_dir.glob("*.png")} == {"loss.png", "rewards.png", "accuracy.png"}
    skipped = (dpo.run_dir / "bad_rows.jsonl").read_text().splitlines()
    assert len(skipped) == 2 and all("identical to chosen" in s for s in skipped)  # train and eval files
    assert dpo.before is not None and dpo.after is not None and dpo.after.pairs == 6
    # the held-out reward accuracy is TRL's eval_rewards/accuracies of the final evaluation
    assert dpo.after.reward_accuracy == pytest.approx(rows[-1]["eval/rewards/accuracies"], abs=1e-6)
    assert dpo.before.reward_accuracy == 0.0  # the starting model is the reference
    card = (dpo.model_dir / "README.md").read_text()
    for needle in (
        "Base model: `",
        "DPO (loss_type sigmoid, beta 0.1)",
        "### Hyperparameters",
        "rewards/accuracies",
        "Transformers",
        "PyTorch",
    ):
        assert needle in card


def test_exported_folder_runs_the_model_card_quick_start(config, capsys):
    sft = run_sft(config)
    card = (sft.model_dir / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    assert f'model="{sft.model_dir.resolve()}"' in code
    exec(code, {})  # noqa: S102 -- the model card's quick start, run exactly as a user would paste it
    printed = capsys.readouterr().out

    from transformers import pipeline

    generator = pipeline("text-generation", model=str(sft.model_dir))
    out = generator([U], max_new_tokens=64, do_sample=False)
    reply = out[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and isinstance(reply["content"], str)
    assert printed == reply["content"] + "\n"  # the quick start printed the assistant's reply
    assert {p.name for p in sft.model_dir.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "generation_config.json",
        "README.md",
    }


def test_recipe_all_trains_three_models_and_compares_them(tmp_path, tiny_llama_dir, monkeypatch):
    from criteriapo.pipeline import run_pipeline

    monkeypatch.setenv("CRITERIAPO_CACHE", str(tmp_path / "cache"))
    write_criteria_data(tmp_path / "crit", prompts=12, held_out=0.25)
    sft = write_jsonl(
        tmp_path / "sft.jsonl", [{"messages": [U, {"role": "assistant", "content": "Paris."}]}] * 4
    )
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"model.name_or_path={tiny_llama_dir}",
            f"sft.data.train={sft}",
            f"dpo.data.train={tmp_path / 'crit' / 'train.jsonl'}",
            f"dpo.data.eval={tmp_path / 'crit' / 'heldout.jsonl'}",
            "dpo.recipe=all",
            "dpo.mini_min_margin=0.3",
            "dpo.train.batch_size=8",
            "tracking.progress=false",
            "tracking.plots=false",
            "eval.prompts=[Hi]",
            "eval.max_new_tokens=4",
        ],
    )
    result = run_pipeline(cfg)
    assert set(result.dpo) == {"vanilla", "mini", "finegrained"}
    assert "recipe finegrained" in (result.dpo["finegrained"].model_dir / "README.md").read_text()
    table = result.comparison.read_text()
    for name in ("base", "sft", "vanilla", "mini", "finegrained"):
        assert f"| {name} |" in table
    assert (result.comparison.parent / "comparison.png").exists()


def test_dpo_without_eval_data(config):
    config.dpo.data.eval = []
    result = run_dpo(config)
    assert result.before is None and result.after is None
    assert "eval/loss" not in result.metrics and (result.model_dir / "model.safetensors").exists()


def test_pipeline_with_plain_pairs_prints_before_and_after(config, capsys, monkeypatch):
    """The main job's path, on the tiny model: SFT, DPO, generations, summary, CLI output."""
    from criteriapo import cli

    config.eval.prompts, config.eval.max_new_tokens = ["Hi"], 3
    monkeypatch.setattr(cli, "_config", lambda args: config)
    assert cli.main(["pipeline"]) == 0
    out = capsys.readouterr().out
    assert "dpo: held-out preference (6 pairs)" in out and "before DPO" in out and "after dpo" in out
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    assert set(summary["dpo"]) == {"dpo"} and summary["dpo"]["dpo"]["after"]["pairs"] == 6


def test_pipeline_stops_on_bad_dpo_data_before_sft_trains(config, tmp_path):
    from criteriapo.data.validation import BadRowsError
    from criteriapo.pipeline import run_pipeline

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q?", "chosen": "same", "rejected": "same"}] * 3)
    config.dpo.data.train = [str(bad)]
    said_once = r"bad.jsonl, 3 rows \(1, 2, 3\), field 'rejected': identical to chosen"
    with pytest.raises(BadRowsError, match=said_once):
        run_pipeline(config)
    assert not (Path(config.output_dir) / "sft").exists()


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 2-layer random GPT-2 with the embedded model's tokenizer: dropout 0.1, as GPT-2's config has."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(smollm2_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256)
    assert config.resid_pdrop == config.attn_pdrop == 0.1
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def first_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if r["step"] == 1 and "loss" in r)


@pytest.mark.parametrize("disable", [True, False])
def test_dpo_turns_dropout_off_so_the_first_step_has_loss_ln2(config, tiny_gpt2_dir, disable):
    config.dpo.disable_dropout = disable
    config.dpo.train.max_steps = 1
    result = run_dpo(config, model_spec=str(tiny_gpt2_dir))
    if disable:
        assert first_loss(result.run_dir) == pytest.approx(math.log(2), abs=1e-6)
    else:  # the policy drops activations the reference keeps: its log-ratios are noise
        assert abs(first_loss(result.run_dir) - math.log(2)) > 1e-4
    config_json = json.loads((result.model_dir / "config.json").read_text())
    assert config_json["resid_pdrop"] == 0.1  # the exported model keeps its own settings


def test_bf16_mixed_scores_the_reference_as_the_policy_computes(config):
    config.dpo.train.precision = "bf16-mixed"
    config.dpo.train.max_steps = 1
    result = run_dpo(config)
    assert first_loss(result.run_dir) == pytest.approx(math.log(2), abs=1e-6)
    assert result.before is not None and result.after is not None


def test_builtin_criteria_data_is_sampled_from_the_model_dpo_starts_from(
    tmp_path, tiny_llama_dir, monkeypatch
):
    """On-policy: the data is made from the given model, once per model (by the digest of its
    files) and settings; criteria data in the SFT stage is refused with the reason."""
    import shutil

    from criteriapo.config import CriteriaDataConfig
    from criteriapo.pipeline import data_paths

    monkeypatch.setenv("CRITERIAPO_CACHE", str(tmp_path / "cache"))
    maker = CriteriaDataConfig(prompts=6, samples=2, held_out=0.5, max_new_tokens=4)
    train, held = data_paths(
        ["builtin:criteria-train", "builtin:criteria-heldout"], str(tiny_llama_dir), maker
    )
    assert train.parent == held.parent and len(train.read_text().splitlines()) == 3
    assert data_paths(["builtin:criteria-train"], str(tiny_llama_dir), maker) == [train]  # made once
    other = tmp_path / "other"
    shutil.copytree(tiny_llama_dir, other)
    assert data_paths(["builtin:criteria-train"], str(other), maker) == [train]  # same bytes, same data
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    assert data_paths(["builtin:criteria-train"], str(other), maker)[0].parent != train.parent
    with pytest.raises(ConfigError, match="sampled from the model DPO starts from"):
        data_paths(["builtin:criteria-train"])


def test_the_pipeline_trains_orpo_from_the_base_model_and_kto_after_sft(config, tmp_path, tiny_llama_dir):
    """ORPO is one stage from the base model (no SFT folder); KTO reads TRL-style unpaired rows (the
    preflight reads them as such before SFT) and trains against the SFT model."""
    from dataclasses import replace

    from criteriapo.pipeline import run_pipeline

    orpo = run_pipeline(replace(config, dpo=replace(config.dpo, loss_type="orpo")))
    out = Path(config.output_dir)
    assert orpo.sft is None and not (out / "sft").exists() and list(orpo.dpo) == ["orpo"]
    assert (out / "orpo" / "model" / "model.safetensors").is_file()
    assert orpo.dpo["orpo"].after is not None  # held-out pairs before and after
    card = (out / "orpo" / "model" / "README.md").read_text()
    assert "# run-orpo" in card and "ORPO (beta 0.1, no reference)" in card

    rows = [
        {"prompt": "Capital of France?", "completion": f"Paris {i}.", "label": i % 2 == 0} for i in range(8)
    ]
    unpaired = write_jsonl(tmp_path / "unpaired.jsonl", rows)
    cfg = replace(
        config,
        output_dir=str(tmp_path / "kto-run"),
        dpo=replace(
            config.dpo, loss_type="kto", data=replace(config.dpo.data, train=[str(unpaired)], eval=[])
        ),
    )
    kto = run_pipeline(cfg)
    assert kto.sft is not None and list(kto.dpo) == ["kto"]
    metrics = [
        json.loads(x) for x in (tmp_path / "kto-run" / "kto" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len([m for m in metrics if "kl" in m]) == 4  # 8 rows, batches of 2
