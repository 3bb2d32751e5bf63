"""ORPO: parity with TRL's ORPOTrainer (test extra only) on the same batch, and the NLL half of the
loss against the model's own cross-entropy.

TRL 1.16 differs from the paper in one place, by design of its own: its NLL term averages over the
prompt's tokens too ("computed over the full prompt and response"). Ours is the paper's, the chosen
reply's tokens only (a user's prompt is not a text to learn). So the odds-ratio half, the rewards,
the averaged log-probs and the log-odds metrics are compared with TRL's at 1e-5 relative in fp32,
and our NLL with the model's own loss on the reply tokens.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")

from criteriapo.config import DPOConfig  # noqa: E402
from criteriapo.data.records import RowRef  # noqa: E402
from criteriapo.data.tokenize import TokenizedPair  # noqa: E402
from criteriapo.rows.pairs import collate_pairs  # noqa: E402
from criteriapo.train.tasks import DPOTask  # noqa: E402

ROWS = [
    ("What color is the sky?", "It is blue.", "It is green, obviously and always."),
    ("Name a prime number.", "Seven is prime.", "Nine."),
    ("Say hello in French.", "Bonjour!", "Hola, amigo, como estas?"),
    ("What is 2+2?", "Four.", "It is five, I believe."),
]


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, smollm2_tokenizer, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    data = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p, _, _ in ROWS],
            "chosen": [[{"role": "assistant", "content": c}] for _, c, _ in ROWS],
            "rejected": [[{"role": "assistant", "content": r}] for _, _, r in ROWS],
        }
    )
    args = ORPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl-orpo")),
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        beta=0.1,
        save_strategy="no",
        max_steps=1,
    )
    trainer = ORPOTrainer(model=model, args=args, train_dataset=data, processing_class=smollm2_tokenizer)
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    pairs = []  # TRL's tokens, as our pairs: the same batch for both
    for i, r in enumerate(rows):
        n = len(r["prompt_input_ids"])
        assert r["chosen_input_ids"][:n] == r["prompt_input_ids"] == r["rejected_input_ids"][:n]
        pairs.append(
            TokenizedPair(
                r["prompt_input_ids"], r["chosen_input_ids"][n:], r["rejected_input_ids"][n:], RowRef("t", i)
            )
        )
    return trainer, batch, model, pairs, smollm2_tokenizer


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_odds_ratio_rewards_and_metrics_match_trl(setup, packing):
    trainer, trl_batch, model, pairs, tok = setup
    model.train()
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, trl_batch)
    trl_metrics = {k: float(v) for k, v in trl_metrics.items()}

    task = DPOTask(DPOConfig(beta=0.1, loss_type="orpo"), tok.pad_token_id, model.config.vocab_size)
    batch = collate_pairs(pairs, range(4), tok.pad_token_id, packing)
    loss, sums = task.loss(model, batch, task.counts(batch))
    ours = {k: s / c for k, (s, c) in sums.items()}

    # the odds-ratio half: the loss without its NLL term
    odds_ours = float(loss.detach()) - ours["nll_loss"]
    odds_trl = float(trl_loss.detach()) - trl_metrics["nll_loss"]
    assert odds_ours == pytest.approx(odds_trl, rel=1e-5)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "log_odds_ratio",
        "log_odds_chosen",
    ):
        assert ours[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key


def test_the_odds_ratio_matches_trl_where_replies_are_likely(setup):
    """A random model gives every token p ~ 1/vocab, where log(1 - p) is ~0 and the odds are the
    probabilities: here per-token averages from -3 to -0.01 make the (1 - p) terms count."""
    from criteriapo.losses.dpo import LOSSES, LogPs, LossParams

    trainer = setup[0]
    g = torch.Generator().manual_seed(0)
    pc, pr = -3 * torch.rand(64, generator=g) - 0.01, -3 * torch.rand(64, generator=g) - 0.01
    trl_losses, *_, trl_ratio, trl_log_odds = trainer.odds_ratio_loss(pc, pr)
    zeros = torch.zeros(64)
    x = LogPs(pc, pr, zeros, zeros)
    spec = LOSSES["orpo"]
    torch.testing.assert_close(spec.fn(x, LossParams(beta=0.1)), -trl_losses, rtol=1e-5, atol=1e-7)
    metrics = spec.metrics(x, LossParams(beta=0.1))
    assert float(metrics["log_odds_ratio"].mean()) == pytest.approx(float(trl_ratio), rel=1e-5)
    assert float(metrics["log_odds_chosen"].mean()) == pytest.approx(float(trl_log_odds), rel=1e-5)


def test_the_nll_is_the_models_own_loss_on_the_chosen_replies(setup):
    _, _, model, pairs, tok = setup
    task = DPOTask(DPOConfig(beta=0.1, loss_type="orpo"), tok.pad_token_id, model.config.vocab_size)
    batch = collate_pairs(pairs, range(4), tok.pad_token_id)
    _, sums = task.loss(model, batch, task.counts(batch))
    s, c = sums["nll_loss"]

    width = max(len(p.prompt_ids) + len(p.chosen_ids) for p in pairs)
    ids = torch.full((4, width), tok.pad_token_id)
    labels = torch.full((4, width), -100)
    mask = torch.zeros((4, width), dtype=torch.long)
    for i, p in enumerate(pairs):
        seq = p.prompt_ids + p.chosen_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p.prompt_ids) : len(seq)] = torch.tensor(p.chosen_ids)
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert s / c == pytest.approx(float(own), rel=1e-5)


def test_orpo_takes_no_reference_and_refuses_rpo_alpha():
    from criteriapo.config import Config
    from criteriapo.errors import ConfigError
    from criteriapo.pipeline import check_choices

    task = DPOTask(DPOConfig(loss_type="orpo"), 0, 16)  # no reference scores, no reference model
    assert task.reference_free
    cfg = Config(dpo=DPOConfig(loss_type="orpo", rpo_alpha=0.5))
    with pytest.raises(ConfigError, match="orpo has the chosen replies' NLL in its loss already"):
        check_choices(cfg)
    with pytest.raises(ConfigError, match="dpo.ref_model: orpo uses no reference model"):
        check_choices(Config(dpo=DPOConfig(loss_type="orpo", ref_model="smollm2")))
