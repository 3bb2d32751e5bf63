"""Parity with TRL's DPOTrainer (the reference implementation; test extra only).

Same tiny model, same rows: TRL's tokenized batch must equal ours, and our per-sequence log-probs,
loss and rewards/* must equal TRL's within 1e-5 relative in fp32, for every loss whose meaning is
the same in both. (TRL 1.16's ``sigmoid`` ignores label_smoothing, and its ``rpo_alpha`` became a
second loss, ``sft``, weighted by alpha; both are matched accordingly.)
"""

from __future__ import annotations

import sys

import pytest
import torch

trl = pytest.importorskip("trl")

from criteriapo.config import DPOConfig  # noqa: E402
from criteriapo.data.records import PreferenceExample, RowRef  # noqa: E402
from criteriapo.data.tokenize import ChatTokenizer, TokenizeOptions  # noqa: E402
from criteriapo.train.tasks import DPOTask  # noqa: E402

ROWS = [
    ("What color is the sky?", "It is blue.", "It is green, obviously and always."),
    ("Name a prime number.", "Seven is prime.", "Nine."),
    ("Say hello in French.", "Bonjour!", "Hola, amigo, como estas?"),
    ("What is 2+2?", "Four.", "It is five, I believe."),
]
CASES = [  # (ours, TRL loss types, TRL weights, label_smoothing)
    ({"loss_type": "sigmoid"}, ["sigmoid"], [1.0], 0.0),
    ({"loss_type": "robust", "label_smoothing": 0.1}, ["robust"], [1.0], 0.1),
    ({"loss_type": "hinge"}, ["hinge"], [1.0], 0.0),
    ({"loss_type": "ipo"}, ["ipo"], [1.0], 0.0),
    ({"loss_type": "apo_zero"}, ["apo_zero"], [1.0], 0.0),
    ({"loss_type": "sppo_hard"}, ["sppo_hard"], [1.0], 0.0),
    ({"loss_type": "nca_pair"}, ["nca_pair"], [1.0], 0.0),
    ({"loss_type": "sigmoid", "rpo_alpha": 0.7}, ["sigmoid", "sft"], [1.0, 0.7], 0.0),
]


class LocalsAtReturn:
    """TRL keeps per-sequence log-probs in locals of ``_compute_loss``; read them as it returns."""

    def __init__(self, fn):
        self.code, self.locals = fn.__code__, {}

    def _call(self, frame, event, arg):
        return self._ret if event == "call" and frame.f_code is self.code else None

    def _ret(self, frame, event, arg):
        if event == "return":
            self.locals = dict(frame.f_locals)
        return self._ret

    def __enter__(self):
        self._prev = sys.gettrace()
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc):
        sys.settrace(self._prev)


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, smollm2_tokenizer, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():  # move the policy away from the reference so every log-ratio is non-zero
        g = torch.Generator().manual_seed(1)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    data = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p, _, _ in ROWS],
            "chosen": [[{"role": "assistant", "content": c}] for _, c, _ in ROWS],
            "rejected": [[{"role": "assistant", "content": r}] for _, _, r in ROWS],
        }
    )
    args = trl.DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=4,
        beta=0.1,
        save_strategy="no",
        max_steps=1,
    )
    trainer = trl.DPOTrainer(
        model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=smollm2_tokenizer
    )
    trl_batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    chat = ChatTokenizer(smollm2_tokenizer)
    pairs = [
        chat.encode_pair(
            PreferenceExample(
                data[i]["prompt"], data[i]["chosen"], data[i]["rejected"], RowRef("parity", i + 1)
            ),
            TokenizeOptions(max_length=None),
        )
        for i in range(4)
    ]
    return trainer, trl_batch, policy, ref, pairs, smollm2_tokenizer


def test_tokenized_batch_is_the_same(setup):
    _trainer, trl_batch, _, _, pairs, tok = setup
    from criteriapo.rows.pairs import collate_pairs

    ours = collate_pairs(pairs, range(4), tok.pad_token_id, packing=False)  # TRL's layout: a padded row each
    assert torch.equal(ours["input_ids"], trl_batch["input_ids"].cpu())
    assert torch.equal(ours["attention_mask"], trl_batch["attention_mask"].cpu())
    labelled = torch.zeros(ours["input_ids"].numel(), dtype=torch.bool)
    labelled[ours["src"] + 1] = True  # the state at src predicts the token after it
    assert torch.equal(labelled.view_as(ours["input_ids"]), trl_batch["completion_mask"].cpu().bool())


@pytest.mark.parametrize(
    "ours, types, weights, eps",
    CASES,
    ids=[c[0]["loss_type"] + ("+rpo" if c[0].get("rpo_alpha") else "") for c in CASES],
)
def test_loss_logps_and_rewards_match_trl(setup, ours, types, weights, eps):
    trainer, trl_batch, policy, ref, pairs, tok = setup
    from criteriapo.rows.pairs import collate_pairs

    trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = types, weights, eps
    trainer.model.train()
    trainer._metrics["train"].clear()
    with LocalsAtReturn(type(trainer)._compute_loss) as cap:
        trl_loss = trainer.compute_loss(trainer.model, trl_batch)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    trl_locals = cap.locals

    task = DPOTask(DPOConfig(beta=0.1, **ours), tok.pad_token_id, policy.config.vocab_size, ref_model=ref)
    batch = collate_pairs(pairs, range(4), tok.pad_token_id)  # packed: each prompt computed once
    loss, sums = task.loss(policy, batch, task.counts(batch))
    metrics = {k: s / c for k, (s, c) in sums.items()}

    from criteriapo.losses.logprobs import batch_logps

    ours_logps = batch_logps(policy, batch, 8).logps.detach()
    trl_logps = torch.cat([trl_locals["chosen_logps"], trl_locals["rejected_logps"]]).detach()
    logps_rel = ((ours_logps - trl_logps).abs() / trl_logps.abs()).max().item()
    loss_rel = abs(float(loss.detach()) / float(trl_loss) - 1)
    keys = [k for k in trl_metrics if k.startswith(("rewards/", "logps/", "logits/"))]
    metric_abs = max(abs(metrics[k] - trl_metrics[k]) for k in keys)
    print(f"\n{types}: log-probs {logps_rel:.1e} rel, loss {loss_rel:.1e} rel, metrics {metric_abs:.1e} abs")
    rel = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(ours_logps, trl_logps, **rel)
    assert float(loss.detach()) == pytest.approx(float(trl_loss), rel=1e-5)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
    ):
        assert metrics[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key
