"""The training loop: accumulation invariance, learning a separable task, schedules, guards, state."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from criteriapo.config import DPOConfig, OptimConfig, TrainConfig
from criteriapo.data.records import RowRef
from criteriapo.data.tokenize import TokenizedPair, TokenizedSFT
from criteriapo.tracking.loggers import Loggers
from criteriapo.train.batching import DataOrder
from criteriapo.train.loop import NonFiniteError, Trainer
from criteriapo.train.optim import lr_at
from criteriapo.train.scores import score_pairs
from criteriapo.train.tasks import DPOTask, SFTTask

PAD = 0


def tiny_model(seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)  # weights ~ N(0, 0.02), as real checkpoints are initialised
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def toy_pairs(n: int = 16, seed: int = 1) -> list[TokenizedPair]:
    """Separable: chosen always ends 10 11, rejected 20 21; prompts vary in length and content."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, 60, (3 + i % 4,), generator=g).tolist()
        out.append(TokenizedPair(prompt, [10, 11, 2], [20, 21, 2], RowRef("toy", i + 1)))
    return out


def toy_sft(n: int = 8) -> list[TokenizedSFT]:
    g = torch.Generator().manual_seed(2)
    out = []
    for i in range(n):
        ids = torch.randint(3, 60, (4 + i % 3,), generator=g).tolist() + [7, 8, 2]
        out.append(TokenizedSFT(ids, [-100] * (len(ids) - 3) + [7, 8, 2], RowRef("toy", i + 1)))
    return out


def dpo_trainer(
    model,
    pairs,
    micro: int,
    batch: int = 8,
    lr: float = 1e-3,
    epochs: int = 1,
    group: bool = False,
    share: bool = True,
    **dpo,
):
    ref = score_pairs(model, pairs, PAD)
    task = DPOTask(DPOConfig(**dpo), PAD, 64, reference=ref)
    return Trainer(
        model,
        task,
        pairs,
        OptimConfig(lr=lr, scheduler="constant"),
        TrainConfig(
            batch_size=batch,
            micro_batch_size=micro,
            epochs=epochs,
            group_by_length=group,
            share_prompts=share,
        ),
        Loggers([]),
        pairs,
    )


def assert_same_gradients(a: Trainer, b: Trainer) -> None:
    la, _, _ = a.accumulate_gradients(list(range(8)))
    lb, _, _ = b.accumulate_gradients(list(range(8)))
    assert la == pytest.approx(lb, rel=1e-5)
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=name)


def shared_toy_pairs(n: int = 8) -> list[TokenizedPair]:
    """As finegrained data has them: prompts with several pairs sharing their replies (a reply chosen
    on one criterion and rejected on another)."""
    replies = [[10, 11, 2], [20, 21, 2], [30, 2], [40, 41, 42, 2]]
    out = []
    for i in range(n):
        prompt = [3 + i // 3, 4, 5 + i // 3][: 2 + i // 3 % 2]
        out.append(
            TokenizedPair(prompt, replies[i % 3], replies[(i % 3 + 1 + i % 2) % 4], RowRef("toy", i + 1))
        )
    return out


@pytest.mark.parametrize("dpo", [{}, {"loss_type": "ipo"}, {"rpo_alpha": 0.5}])
@pytest.mark.parametrize("data", [toy_pairs, shared_toy_pairs])
def test_dpo_accumulation_8x1_equals_1x8(dpo, data):
    """With shared prompts, the one micro-batch computes each distinct sequence once and the eight
    compute each pair alone: the loss and gradients are the same."""
    pairs = data(8)
    assert_same_gradients(
        dpo_trainer(tiny_model(), pairs, micro=1, **dpo), dpo_trainer(tiny_model(), pairs, micro=8, **dpo)
    )


def test_sft_accumulation_normalises_by_global_token_count():
    data = toy_sft(8)  # sequences of different lengths: per-micro-batch means would differ
    a, b = (
        Trainer(
            tiny_model(),
            SFTTask(PAD),
            data,
            OptimConfig(lr=1e-3),
            TrainConfig(batch_size=8, micro_batch_size=micro),
            Loggers([]),
        )
        for micro in (1, 8)
    )
    assert_same_gradients(a, b)


def test_a_full_step_reports_the_same_loss_and_norm():
    pairs = toy_pairs(8)
    a, b = dpo_trainer(tiny_model(), pairs, micro=1), dpo_trainer(tiny_model(), pairs, micro=8)
    ma, mb = a.train_step(list(range(8))), b.train_step(list(range(8)))
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5)
    assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-5)


def test_tiny_model_separates_a_toy_preference_set():
    pairs = toy_pairs(16)
    trainer = dpo_trainer(tiny_model(), pairs, micro=4, lr=1e-3, epochs=10)
    before = trainer.evaluate()["eval/rewards/accuracies"]
    final = trainer.train()
    assert before == 0.0  # policy == reference: every margin is exactly zero
    assert final["eval/rewards/accuracies"] == 1.0
    assert final["eval/loss"] < math.log(2) - 0.1


def test_training_is_deterministic():
    runs = []
    for _ in range(2):
        model = tiny_model()
        dpo_trainer(model, toy_pairs(16), micro=4, epochs=2).train()
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),  # decays over the 4 steps after warm-up
        ("cosine", [0.5, 1.0, 1.0, 0.853553, 0.5, 0.146447]),
    ],
)
def test_schedules_with_warmup(kind, expected):
    cfg = OptimConfig(lr=1.0, scheduler=kind, warmup_steps=2)
    got = [lr_at(s, cfg, total_steps=6) for s in range(6)]
    assert got == pytest.approx(expected, abs=1e-6)


def test_non_finite_loss_stops_before_the_optimizer_steps():
    model = tiny_model()
    pairs = toy_pairs(8)
    trainer = dpo_trainer(model, pairs, micro=4)
    with torch.no_grad():
        model.model.embed_tokens.weight[pairs[3].prompt_ids[0]] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        NonFiniteError,
        match=r"step 1: loss nan .* the step's rows: toy, row 1; toy, row 2; .* Nothing was updated",
    ):
        trainer.train_step(list(range(8)))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], equal_nan=True)


def test_data_order_is_seeded_and_resumable():
    a = DataOrder(10, seed=3)
    first = [a.next_batch(4) for _ in range(5)]  # crosses into the second epoch
    assert sorted(first[0] + first[1] + first[2]) == list(range(10)) and len(first[2]) == 2
    b = DataOrder(10, seed=3)
    b.next_batch(4)
    b.next_batch(4)
    c = DataOrder(10, seed=3)
    c.load_state_dict(b.state_dict())
    assert [c.next_batch(4) for _ in range(3)] == first[2:]
    with pytest.raises(ValueError, match="seed 3 and 10 examples"):
        DataOrder(11, seed=3).load_state_dict(b.state_dict())


def test_length_grouped_order_batches_similar_lengths_and_resumes():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 1000, (203,), generator=g).tolist()
    grouped, plain = DataOrder(203, 5, lengths, batch_size=8), DataOrder(203, 5)
    batches = [grouped.next_batch(8) for _ in range(26)]  # one epoch: 25 full batches, then 3
    assert sorted(i for b in batches for i in b) == list(range(203)) and len(batches[-1]) == 3

    def spread(order_batches):  # mean of (longest - shortest) within a batch
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in order_batches) / 25

    assert spread(batches[:25]) < spread([plain.next_batch(8) for _ in range(25)]) / 4
    longest = [max(lengths[i] for i in b) for b in batches[:25]]
    assert longest != sorted(longest, reverse=True)  # the batches themselves come in random order
    again = DataOrder(203, 5, lengths, batch_size=8)
    again.load_state_dict(grouped.state_dict())
    assert again.next_batch(8) == grouped.next_batch(8)  # the second epoch, from the saved position


def test_units_stay_together_in_every_order():
    units = [[0, 5, 6], [1], [2, 7], [3, 4, 8, 9]]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 100, (10,), generator=g).tolist()
    for lens in (None, lengths):
        order = DataOrder(10, seed=2, lengths=lens, batch_size=3, units=units)
        for _epoch in range(3):
            batches = [order.next_batch(3) for _ in range(4)]
            flat = [i for b in batches for i in b]
            assert sorted(flat) == list(range(10))
            for u in units:
                at = sorted(flat.index(i) for i in u)
                if lens is None:
                    assert at == list(range(at[0], at[0] + len(u))), (flat, u)  # consecutive
                # batches sorted by length are shuffled: a unit is at most in the batches it straddles
                touched = {k for k, b in enumerate(batches) if set(b) & set(u)}
                assert len(touched) <= (len(u) + 1) // 3 + 1, (batches, u)
    # each example a unit of its own: the order of no units at all, so older runs resume the same
    plain, singles = DataOrder(10, seed=4), DataOrder(10, seed=4, units=[[i] for i in range(10)])
    assert [plain.next_batch(3) for _ in range(8)] == [singles.next_batch(3) for _ in range(8)]
    with pytest.raises(ValueError, match="each of the 10 examples once"):
        DataOrder(10, seed=0, units=[[0, 1], [1, 2]])


def test_a_prompts_pairs_share_a_batch():
    pairs = shared_toy_pairs(9)
    trainer = dpo_trainer(tiny_model(), pairs, micro=3, batch=3)
    assert trainer.order.units == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    batches = [sorted(trainer.order.next_batch(3)) for _ in range(3)]
    assert sorted(batches) == trainer.order.units
    apart = dpo_trainer(tiny_model(), pairs, micro=3, batch=3, share=False)
    assert apart.order.units == [[i] for i in range(9)]


@pytest.mark.parametrize("group", [False, True])
def test_trainer_state_round_trip_continues_identically(group):
    pairs = toy_pairs(16)
    straight = dpo_trainer(tiny_model(), pairs, micro=4, epochs=2, group=group)
    assert (straight.order.lengths is not None) == group
    for _ in range(3):
        straight.train_step(straight.order.next_batch(8))
    state = copy.deepcopy(straight.state_dict())
    resumed = dpo_trainer(tiny_model(), pairs, micro=4, epochs=2, group=group)  # weights from step 0
    resumed.load_state_dict(state)
    m1 = straight.train_step(straight.order.next_batch(8))
    m2 = resumed.train_step(resumed.order.next_batch(8))
    assert m1["loss"] == m2["loss"] and resumed.state.step == straight.state.step == 4
    for pa, pb in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_reference_cache_scores_each_sequence_once():
    model = tiny_model()
    pairs = toy_pairs(6)
    cache: dict = {}
    first = score_pairs(model, pairs[:4], PAD, cache=cache)
    assert len(cache) == 8  # 4 pairs x (chosen, rejected), all distinct
    swapped = [TokenizedPair(p.prompt_ids, p.rejected_ids, p.chosen_ids, p.source) for p in pairs[:4]]
    again = score_pairs(model, swapped + pairs[4:], PAD, cache=cache)
    assert len(cache) == 12  # only the 2 new pairs were scored
    torch.testing.assert_close(again.chosen.logps[:4], first.rejected.logps)
    fresh = score_pairs(model, swapped + pairs[4:], PAD)
    torch.testing.assert_close(again.chosen.logps, fresh.chosen.logps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["simpo", "sigmoid", "ipo"])
def test_rewards_measure_what_the_loss_optimises(loss_type):
    """SimPO's loss sees per-token averages, so its rewards/* do too (as TRL's CPO trainer logs
    them); the other losses log whole-sequence rewards, as TRL's DPO trainer does (IPO included)."""
    from criteriapo.losses.logprobs import batch_logps
    from criteriapo.rows.pairs import collate_pairs

    model, pairs = tiny_model(0), toy_pairs(4)
    ref = score_pairs(tiny_model(1), pairs, PAD)  # another model, so the log-ratios are not zero
    task = DPOTask(DPOConfig(loss_type=loss_type, beta=0.5), PAD, 64, reference=ref)
    batch = collate_pairs(pairs, range(4), PAD)
    with torch.no_grad():
        _, sums = task.loss(model, batch, task.counts(batch))
        out = batch_logps(model, batch, 8)
    pc, pr, nc, nr = out.logps[:4], out.logps[4:], out.num_tokens[:4], out.num_tokens[4:]
    rc, rr = (
        (torch.zeros(4), torch.zeros(4)) if loss_type == "simpo" else (ref.chosen.logps, ref.rejected.logps)
    )
    if loss_type == "simpo":
        pc, pr = pc / nc, pr / nr
    margins = 0.5 * ((pc - rc) - (pr - rr))
    assert sums["rewards/margins"][0] / 4 == pytest.approx(float(margins.mean()), rel=1e-5)
    assert sums["logps/chosen"][0] / 4 == pytest.approx(float(pc.mean()), rel=1e-5)


@pytest.mark.parametrize(
    ("setting", "checkpointing", "in_backward", "returns"),
    [
        (None, True, False, True),  # the default: checkpointing puts memory first
        (None, False, False, False),
        (None, False, True, True),
        (False, True, False, False),  # asked not to: faster, a higher peak
        (True, False, False, True),
    ],
)
def test_train_return_memory_sets_whether_the_trainer_returns_memory(
    monkeypatch, setting, checkpointing, in_backward, returns
):
    """train.return_memory decides; unset, the memory-first settings (gradient checkpointing, the
    optimizer in backward) return memory and the others do not. Counted by the returns a step makes."""
    from criteriapo.train import loop

    trims = []
    monkeypatch.setattr(loop, "_return_free_memory", lambda device: trims.append(device))
    model, pairs = tiny_model(), toy_pairs(8)
    train = TrainConfig(
        batch_size=8,
        return_memory=setting,
        gradient_checkpointing=checkpointing,
        optimizer_in_backward=in_backward,
    )
    optim = OptimConfig(lr=1e-3, scheduler="constant", max_grad_norm=None if in_backward else 1.0)
    task = DPOTask(DPOConfig(), PAD, 64, reference=score_pairs(model, pairs, PAD))
    trainer = Trainer(model, task, pairs, optim, train, Loggers([]))
    trainer.train_step(list(range(8)))
    assert trainer.return_memory is returns
    assert len(trims) == (loop.RETURNS + 1 if returns else 0)


def test_a_trainer_that_returns_memory_also_does_it_within_backward(monkeypatch):
    """After the output layer's backward (only the last parameter's gradient is there) and each
    quarter of the way back through the parameters (more gradients each time), then after the step;
    never when the trainer does not return memory; a second trainer of the same model adds no
    returns of its own."""
    from criteriapo.train import loop

    model = tiny_model()
    params = list(model.parameters())
    trims = []
    monkeypatch.setattr(
        loop, "_return_free_memory", lambda device: trims.append(sum(p.grad is not None for p in params))
    )
    trainer = dpo_trainer(model, toy_pairs(8), micro=8)
    trainer.return_memory = True
    trainer.train_step(list(range(8)))
    within, after = trims[: loop.RETURNS], trims[loop.RETURNS :]
    assert within[0] == 1 and within == sorted(set(within)) and within[-1] < len(params) and after == [0]
    trims.clear()
    trainer.return_memory = False
    trainer.train_step(list(range(8)))
    assert trims == []
    second = dpo_trainer(model, toy_pairs(8), micro=8)
    second.return_memory = True
    second.train_step(list(range(8)))
    assert len(trims) == loop.RETURNS + 1
