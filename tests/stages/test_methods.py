"""The method registry: each entry declares its data kind and its reference, the stages read them, and
SFT is an entry that goes through the same stage sequence as the preference methods."""

from __future__ import annotations

import json

import pytest
import torch

from criteriapo.config import Config, DPOConfig, LoraConfig, load_config
from criteriapo.data.formats import DataKind
from criteriapo.data.records import RowRef
from criteriapo.data.tokenize import TokenizedPair
from criteriapo.distributed import SINGLE
from criteriapo.errors import ConfigError
from criteriapo.models import load_model, resolve_model
from criteriapo.models.lora import apply_lora
from criteriapo.stages.methods import METHODS, Reference, method_of
from criteriapo.stages.preference import reference_note, references
from criteriapo.stages.sft import run_sft
from criteriapo.train.precision import resolve_precision
from criteriapo.train.scores import PairScores
from tests.helpers import write_jsonl

LORA = LoraConfig(enabled=True)


def test_every_entry_declares_its_data_kind_and_section():
    kinds = {name: (m.data_kind, m.section, m.task.__name__) for name, m in METHODS.items()}
    assert kinds == {
        "sft": (DataKind.SFT, "sft", "SFTTask"),
        "dpo": (DataKind.PREFERENCE, "dpo", "DPOTask"),
        "orpo": (DataKind.PREFERENCE, "dpo", "DPOTask"),
        "kto": (DataKind.UNPAIRED, "dpo", "KTOTask"),
    }
    assert all(m.name == name and m.data_kind in tuple(DataKind) for name, m in METHODS.items())
    assert DataKind.UNPAIRED == "unpaired" and json.dumps(DataKind.PREFERENCE) == '"preference"'


@pytest.mark.parametrize(
    "method, settings, reference",
    [
        ("sft", {}, Reference.NONE),
        ("orpo", {"loss_type": "orpo"}, Reference.NONE),
        ("dpo", {}, Reference.PRECOMPUTED),
        ("dpo", {"lora": LORA}, Reference.PRECOMPUTED),  # scored with the adapters off, once
        ("dpo", {"precompute_ref_log_probs": False}, Reference.FROZEN_MODEL),
        ("dpo", {"precompute_ref_log_probs": False, "lora": LORA}, Reference.ADAPTERS_OFF),
        ("dpo", {"ref_model": "other"}, Reference.FROZEN_MODEL),
        (
            "dpo",
            {"ref_model": "other", "precompute_ref_log_probs": False, "lora": LORA},
            Reference.FROZEN_MODEL,
        ),
        ("dpo", {"loss_type": "simpo"}, Reference.NONE),
        ("dpo", {"reference_free": True, "precompute_ref_log_probs": False}, Reference.NONE),
        ("kto", {"loss_type": "kto"}, Reference.PRECOMPUTED),
        ("kto", {"loss_type": "kto", "precompute_ref_log_probs": False}, Reference.FROZEN_MODEL),
        (
            "kto",
            {"loss_type": "kto", "precompute_ref_log_probs": False, "lora": LORA},
            Reference.ADAPTERS_OFF,
        ),
    ],
)
def test_each_method_declares_its_reference(method, settings, reference):
    cfg = Config(dpo=DPOConfig(**settings))
    entry = METHODS[method]
    assert entry.reference(entry.config(cfg)) is reference
    if method != "sft":
        assert method_of(cfg.dpo) is entry


def test_sft_is_no_loss_type():
    with pytest.raises(ConfigError, match="dpo.loss_type: unknown loss 'sft'"):
        method_of(DPOConfig(loss_type="sft"))


@pytest.mark.parametrize(
    "settings, note",
    [
        ({}, "the starting weights, log-probs precomputed"),
        ({"lora": LORA}, "the starting weights (LoRA adapters off), log-probs precomputed"),
        (
            {"precompute_ref_log_probs": False, "lora": LORA},
            "the starting weights (LoRA adapters off), kept frozen",
        ),
        ({"ref_model": "other"}, "other, log-probs precomputed"),
        ({"loss_type": "simpo"}, "none (reference-free)"),
    ],
)
def test_the_model_card_names_the_declared_reference(settings, note):
    d = DPOConfig(**settings)
    assert reference_note(d, method_of(d).reference(d)) == note


def _pairs(n: int) -> list[TokenizedPair]:
    return [
        TokenizedPair([5, 6, 7 + i], [20 + i, 21, 2], [30 + i, 31], RowRef("x.jsonl", i + 1))
        for i in range(n)
    ]


def _references(tiny_llama_dir, **settings):
    """What :func:`references` gives a policy loaded from the tiny model (LoRA when asked)."""
    cfg = Config(dpo=DPOConfig(**settings))
    cfg.tracking.progress = False
    source = resolve_model(str(tiny_llama_dir))
    model = load_model(source, dtype=torch.float32, device="cpu")
    if cfg.dpo.lora.enabled:
        model = apply_lora(model, cfg.dpo.lora)
    precision = resolve_precision("fp32", torch.float32)
    start = object()  # the starting model's held-out scores, handed through by a precomputed reference
    got = references(cfg, source, model, 0, _pairs(3), _pairs(2), start, None, SINGLE, precision, True)
    return got, model, start


def test_the_declared_reference_is_the_one_the_stage_provides(tiny_llama_dir):
    (train, evals, ref), _, _ = _references(tiny_llama_dir, loss_type="simpo")
    assert (train, evals, ref) == (None, None, None)  # NONE

    (train, evals, ref), policy, _ = _references(tiny_llama_dir, precompute_ref_log_probs=False, lora=LORA)
    assert train is None and evals is None and ref is policy  # ADAPTERS_OFF: no copy

    (train, evals, ref), policy, _ = _references(tiny_llama_dir, precompute_ref_log_probs=False)
    assert train is None and evals is None  # FROZEN_MODEL: a copy scores each batch
    assert ref is not policy and not any(p.requires_grad for p in ref.parameters())

    (train, evals, ref), _, start = _references(tiny_llama_dir)
    assert isinstance(train, PairScores) and len(train) == 3 and evals is start and ref is None  # PRECOMPUTED

    # dpo.ref_model, precomputed: the model loaded frozen scores every sequence once, then is let go
    (other, other_evals, ref), _, _ = _references(tiny_llama_dir, ref_model=str(tiny_llama_dir))
    assert ref is None and len(other_evals) == 2
    torch.testing.assert_close(other.margins, train.margins)  # the same weights, the same scores


def test_sft_goes_through_the_stage_sequence_its_entry_describes(tmp_path, tiny_llama_dir):
    u = {"role": "user", "content": "Capital of France?"}
    rows = [{"messages": [u, {"role": "assistant", "content": f"Paris {i}."}]} for i in range(4)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"model.name_or_path={tiny_llama_dir}",
            f"sft.data.train={data}",
            "sft.train.batch_size=2",
            "tracking.progress=false",
            "tracking.plots=false",
        ],
    )
    first = run_sft(cfg)
    assert first.run_dir == tmp_path / "run" / METHODS["sft"].folder(None)
    assert list(first.seconds) == ["prepare", "train", "export"] and first.before is first.after is None
    assert "- Method: SFT\n" in (first.model_dir / "README.md").read_text()  # the entry's card line
    record = json.loads((first.run_dir / "finished.json").read_text())
    assert set(record["run"]["config"]) == {"model", "sft"}  # keyed by its section; no recipe
    again = run_sft(cfg, resume=True)  # the same run, finished: nothing trains again
    assert list(again.seconds) == ["prepare"] and again.metrics == first.metrics
