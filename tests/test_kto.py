"""KTO: unpaired data read as TRL writes it (and pairs split in two), the KL partners, and parity
with TRL's KTOTrainer (test extra only): the same batch (TRL's tokens and its mismatched KL
completions) gives the same loss, KL estimate, rewards, log-probs and logits, 1e-5 relative in fp32."""

from __future__ import annotations

import contextlib

import pytest
import torch

from criteriapo.config import DPOConfig
from criteriapo.data.loading import load_data
from criteriapo.data.records import RowRef
from criteriapo.data.tokenize import TokenizedUnpaired, TokenizeOptions, assign_kl
from criteriapo.errors import DataError
from criteriapo.train.loop import _totals
from criteriapo.train.scores import PairScores, SequenceScores
from criteriapo.train.tasks import KTOTask
from tests.helpers import write_jsonl

PROMPTS = ["What color is the sky?", "Name a prime number.", "Say hello in French.", "What is 2+2?"]
COMPLETIONS = ["It is blue.", "Nine.", "Bonjour!", "It is five, I believe."]
LABELS = [True, False, True, False]


def test_unpaired_rows_and_pairs_read_as_labelled_completions(tmp_path):
    rows = [
        {"prompt": "Q?", "completion": "Good.", "label": True},
        {
            "prompt": [{"role": "user", "content": "Q?"}],
            "completion": [{"role": "assistant", "content": "Bad."}],
            "label": False,
        },
        {"prompt": "P?", "chosen": "Yes.", "rejected": "No."},  # a pair: two examples
    ]
    data = load_data(write_jsonl(tmp_path / "u.jsonl", rows), kind="unpaired")
    got = [
        (e.completion if isinstance(e.completion, str) else e.completion[0]["content"], e.label)
        for e in data.examples
    ]
    assert got == [("Good.", True), ("Bad.", False), ("Yes.", True), ("No.", False)]


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"prompt": "Q?", "completion": "A.", "label": "yes"},
            "field 'label': expected true or false, got str 'yes'",
        ),
        ({"prompt": "Q?", "completion": "A.", "label": 1}, "expected true or false, got int 1"),
        ({"completion": "A.", "label": True}, "field 'prompt': missing"),
    ],
)
def test_bad_unpaired_rows_are_named(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q?", "completion": "A.", "label": True}, row])
    with pytest.raises(DataError) as e:
        load_data(path, kind="unpaired")
    assert message in str(e.value) and "row 2" in str(e.value)


def test_kl_partners_have_another_prompt_and_are_fixed_by_the_seed():
    ex = [
        TokenizedUnpaired([p], [100 + i], i % 2 == 0, RowRef("t", i))
        for i, p in enumerate([1, 1, 2, 2, 3, 3])
    ]
    assign_kl(ex, 0, TokenizeOptions(max_length=None))
    first = [e.kl_ids for e in ex]
    for e in ex:
        partner = next(o for o in ex if o.completion_ids == e.kl_ids)
        assert partner.prompt_ids != e.prompt_ids
    assign_kl(ex, 0, TokenizeOptions(max_length=None))
    assert [e.kl_ids for e in ex] == first
    assign_kl(ex, 1, TokenizeOptions(max_length=None))
    assert [e.kl_ids for e in ex] != first  # another seed, other partners (for these six)


@pytest.fixture(scope="module")
def trl_setup(tiny_llama_dir, smollm2_tokenizer, tmp_path_factory):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():  # away from the reference, so every log-ratio and the KL are non-zero
        g = torch.Generator().manual_seed(1)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    data = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p in PROMPTS],
            "completion": [[{"role": "assistant", "content": c}] for c in COMPLETIONS],
            "label": LABELS,
        }
    )
    args = trl.KTOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl-kto")),
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        beta=0.1,
        desirable_weight=1.0,
        undesirable_weight=1.5,
        save_strategy="no",
        max_steps=1,
    )
    trainer = trl.KTOTrainer(
        model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=smollm2_tokenizer
    )
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    ours = [
        TokenizedUnpaired(
            r["prompt_ids"], r["completion_ids"], r["label"], RowRef("t", i), r["KL_completion_ids"]
        )
        for i, r in enumerate(rows)
    ]
    return trainer, batch, policy, ref, ours, smollm2_tokenizer


@pytest.mark.parametrize("reference", ["frozen model", "precomputed"])
def test_loss_kl_and_metrics_match_trl(trl_setup, reference):
    from criteriapo.train.scores import score_pairs

    trainer, trl_batch, policy, ref, examples, tok = trl_setup
    policy.train()
    trainer._metrics["train"].clear()
    trl_loss = trainer.compute_loss(policy, trl_batch)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    cfg = DPOConfig(beta=0.1, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.5)
    if reference == "precomputed":
        scores = score_pairs(ref, [e.as_pair() for e in examples], tok.pad_token_id)
        task = KTOTask(cfg, tok.pad_token_id, policy.config.vocab_size, reference=scores)
    else:
        task = KTOTask(cfg, tok.pad_token_id, policy.config.vocab_size, ref_model=ref)
    batch = task.collate(examples, range(4))
    loss, sums = task.loss(policy, batch, _totals(task, [batch], policy, contextlib.nullcontext))
    ours = {k: s / c for k, (s, c) in sums.items()}
    assert float(loss.detach()) == pytest.approx(float(trl_loss), rel=1e-5)
    # the KL estimate is a difference of log-probs near -60 that each agree to ~1e-7 relative, so it
    # agrees to ~1e-5 absolute: compared at that scale
    assert ours["kl"] == pytest.approx(trl_metrics["kl"], abs=2e-5)
    keys = (
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
    )
    for key in keys:
        assert ours[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key


def test_kto_needs_a_reference():
    with pytest.raises(ValueError, match="needs reference scores or a reference model"):
        KTOTask(DPOConfig(loss_type="kto"), 0, 16)
    side = SequenceScores(torch.zeros(1), torch.ones(1, dtype=torch.long))
    scores = PairScores(side, side)
    assert KTOTask(DPOConfig(loss_type="kto"), 0, 16, reference=scores).reference is scores


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"rpo_alpha": 0.5}, "dpo.rpo_alpha: a setting of the paired losses"),
        ({"label_smoothing": 0.1}, "dpo.label_smoothing: a setting of the paired losses"),
        ({"reference_free": True}, "KTO's rewards are log-ratios against a reference"),
        ({"recipe": "vanilla"}, "KTO reads unpaired rows or pairs"),
    ],
)
def test_settings_kto_cannot_use_are_refused(settings, message):
    from criteriapo.config import Config
    from criteriapo.errors import ConfigError
    from criteriapo.pipeline import check_choices

    with pytest.raises(ConfigError, match=message):
        check_choices(Config(dpo=DPOConfig(loss_type="kto", **settings)))
