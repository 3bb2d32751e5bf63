"""The model zoo: on every architecture in tests/zoo.py, our log-probs are the model's own, packed
rows equal padded ones (or packing is switched off with the reason), the first DPO step has loss
ln 2 in every precision, and the exported folder reloads with the same logits."""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch

from criteriapo.config import DPOConfig, OptimConfig, TrainConfig
from criteriapo.data.records import RowRef
from criteriapo.data.tokenize import TokenizedPair
from criteriapo.export import ModelCard, export_model
from criteriapo.losses.logprobs import batch_logps, sequence_logps
from criteriapo.models.training import disable_dropout
from criteriapo.rows.packing import packing_problem, resolve_packing
from criteriapo.rows.pairs import collate_pairs
from criteriapo.tracking.loggers import Loggers
from criteriapo.train.guard import check_logprobs, packing_matches
from criteriapo.train.loop import Trainer
from criteriapo.train.precision import resolve_precision
from criteriapo.train.scores import score_pairs
from criteriapo.train.tasks import DPOTask
from tests.zoo import VOCAB, ZOO, zoo_model

PAD = 0
ARCHS = list(ZOO)
# packing off for windows, sliding and hybrid layers (read from a composite model's text config);
# Qwen2-MoE's sliding_window 0 is no window (the README's table)
PACKING_OFF = {"mistral", "gemma2", "gemma3_text", "gemma3", "falcon_h1"}


def pairs() -> list[TokenizedPair]:
    """Prompts of 0 to 9 tokens and completions of 1 to 8: longer than the zoo's sliding windows;
    three pairs of one prompt share a reply."""
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(3, VOCAB - 4, (n,), generator=g).tolist()

    shapes = [(9, 3, 8), (0, 4, 2), (7, 1, 6), (2, 6, 1)]
    out = [TokenizedPair(ids(p), ids(c), ids(r), RowRef("zoo", i)) for i, (p, c, r) in enumerate(shapes)]
    # as finegrained pairs are: more pairs of the first prompt, sharing its replies (computed once)
    first = out[0]
    out.append(TokenizedPair(first.prompt_ids, first.chosen_ids, ids(5), RowRef("zoo", 4)))
    out.append(TokenizedPair(first.prompt_ids, ids(2), first.chosen_ids, RowRef("zoo", 5)))
    return out


def own_logps(model, ids, mask, labels) -> torch.Tensor:
    """Sum of log p(label) from the model's own logits: the definition we must meet."""
    logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)[:, :-1]
    shifted = labels[:, 1:]
    keep = shifted != -100
    return (logp.gather(-1, shifted.clamp(min=0)[..., None]).squeeze(-1) * keep).sum(-1)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_logprobs_are_the_models_own(arch):
    model = zoo_model(arch).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB - 4, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding, as in a padded batch
    labels = ids.clone()
    labels[:, :5] = -100
    labels[mask == 0] = -100
    check_logprobs(model, ids.tolist(), PAD)  # calibrates the logit transform, or refuses
    ours = sequence_logps(model, ids, mask, labels).logps
    torch.testing.assert_close(ours, own_logps(model, ids, mask, labels), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_packed_equals_padded_or_packing_is_off_with_the_reason(arch, caplog):
    model = zoo_model(arch).eval()
    ps = pairs()
    problem = packing_problem(model.config)
    assert (problem is not None) == (arch in PACKING_OFF), problem
    if problem is not None:
        with caplog.at_level(logging.WARNING):
            assert resolve_packing(model, True, "dpo.train.packing") is False
        assert f"off for this model, because {problem}" in caplog.text
        return
    n = 2 * len(ps)
    packed = batch_logps(model, collate_pairs(ps, range(len(ps)), PAD, packing=True), n)
    padded = batch_logps(model, collate_pairs(ps, range(len(ps)), PAD, packing=False), n)
    torch.testing.assert_close(packed.logps, padded.logps, rtol=1e-5, atol=1e-5)
    assert packing_matches(model, lambda p: (collate_pairs(ps, range(len(ps)), PAD, p), n))[0]


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
@pytest.mark.parametrize("arch", ARCHS)
def test_first_dpo_step_has_loss_ln2(arch, precision):
    model = zoo_model(arch)
    disable_dropout(model)  # as the DPO stage does (dpo.disable_dropout)
    prec = resolve_precision(precision, torch.float32)
    ps = pairs()
    packing = packing_problem(model.config) is None
    ref = score_pairs(model, ps, PAD, micro_batch_size=len(ps), packing=packing, precision=prec)
    task = DPOTask(DPOConfig(), PAD, VOCAB, reference=ref, packing=packing)
    train = TrainConfig(batch_size=len(ps), precision=precision)
    trainer = Trainer(model, task, ps, OptimConfig(lr=1e-3), train, Loggers([]), precision=prec)
    metrics = trainer.train_step(list(range(len(ps))))
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_exported_folder_reloads_with_the_same_logits(arch, tmp_path, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    model = zoo_model(arch).eval()
    card = ModelCard(name=arch, base_model="tiny", method="DPO", datasets=[], hyperparameters={})
    export_model(model, smollm2_tokenizer, tmp_path / "model", card)
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "model").iterdir()}
    assert set(modes.values()) == {0o666 & ~mask}, modes  # model.safetensors as readable as the rest
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert type(again) is type(model)
    ids = torch.randint(3, VOCAB - 4, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
