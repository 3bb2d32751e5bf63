"""Packed batches (several examples per row, a pair's prompt computed once) give the log-probs and
gradients of one padded row per sequence."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from criteriapo.data.records import RowRef
from criteriapo.data.tokenize import TokenizedPair
from criteriapo.errors import ConfigError
from criteriapo.losses.logprobs import batch_logps
from criteriapo.rows.packing import (
    CHOSEN,
    REJECTED,
    SHARED,
    attention_mask,
    collate,
    packing_problem,
    pair_segment,
    prompt_segment,
    resolve_packing,
    sequence_segment,
)
from criteriapo.rows.pairs import collate_pairs
from criteriapo.train.scores import score_pairs

PAD = 0
SMALL = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def model(kind: str, attn: str):
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**SMALL, attn_implementation=attn))
    return Qwen2ForCausalLM(Qwen2Config(**SMALL, attn_implementation=attn))


def pairs() -> list[TokenizedPair]:
    """Prompts of 0 to 7 tokens, completions of 1 to 6: rows of very different lengths."""
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(3, 60, (n,), generator=g).tolist()

    shapes = [(5, 3, 4), (0, 4, 2), (7, 1, 6), (2, 6, 1), (1, 2, 2), (3, 5, 5)]
    return [TokenizedPair(ids(p), ids(c), ids(r), RowRef("toy", i)) for i, (p, c, r) in enumerate(shapes)]


def test_pair_segment_layout():
    s = pair_segment([1, 2], [3, 4], [5, 6, 7], 0, 1)
    assert s.ids == [1, 2, 3, 4, 5, 6, 7]
    assert s.positions == [0, 1, 2, 3, 2, 3, 4]
    assert s.branch == [SHARED, SHARED, CHOSEN, CHOSEN, REJECTED, REJECTED, REJECTED]
    # chosen 3 from offset 1 (the prompt's last), 4 from 2; rejected 5 from offset 1 too, 6 from 4, 7 from 5
    assert list(zip(s.src, s.target, s.seq, strict=True)) == [
        (1, 3, 0),
        (2, 4, 0),
        (1, 5, 1),
        (4, 6, 1),
        (5, 7, 1),
    ]
    assert s.tokens == 2 * 2 + 2 + 3


def test_mask_keeps_segments_and_branches_apart():
    batch = collate([pair_segment([1], [2, 3], [4], 0, 2), sequence_segment([5, 6], [-100, 6], 1)], PAD)
    mask = attention_mask(batch["segment"], batch["branch"], "sdpa", torch.float32)[0, 0]
    # one row: [1 2 3 4 | 5 6]; the pair is the longest segment (4), so the sequence needs a row of its own
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, PAD, PAD]]
    assert mask.int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 0, 0, 1],  # the rejected token sees the prompt and itself, not the chosen tokens
    ]
    second = attention_mask(batch["segment"], batch["branch"], "sdpa", torch.float32)[1, 0]
    assert second.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


def test_a_prompt_with_three_completions_computes_it_once():
    s = prompt_segment([1, 2], [([3, 4], 5), ([6], 0), ([7, 8], 9)])
    assert s.ids == [1, 2, 3, 4, 6, 7, 8]
    assert s.positions == [0, 1, 2, 3, 2, 2, 3]
    assert s.branch == [SHARED, SHARED, 1, 1, 2, 3, 3]
    assert list(zip(s.src, s.target, s.seq, strict=True)) == [
        (1, 3, 5),
        (2, 4, 5),
        (1, 6, 0),
        (1, 7, 9),
        (5, 8, 9),
    ]
    assert s.tokens == 3 * 2 + 2 + 1 + 2
    mask = attention_mask(collate([s], PAD)["segment"], collate([s], PAD)["branch"], "sdpa", torch.float32)
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # the second completion sees the prompt and itself
        [1, 1, 0, 0, 0, 1, 0],  # the third sees neither of the others
        [1, 1, 0, 0, 0, 1, 1],
    ]


def shared_pairs() -> list[TokenizedPair]:
    """Finegrained-style pairs: one prompt's reply X is chosen on two criteria and rejected on a
    third, another prompt's pair repeats a reply, and one pair stands alone."""
    a, b, c = [5, 6, 7], [9], [11, 12, 13, 14]
    x, y, z, w = [20, 21, 22], [23, 24], [25], [26, 27, 28, 29]
    return [
        TokenizedPair(a, x, y, RowRef("toy", 1)),
        TokenizedPair(b, z, w, RowRef("toy", 2)),
        TokenizedPair(a, x, z, RowRef("toy", 3)),
        TokenizedPair(a, w, x, RowRef("toy", 4)),
        TokenizedPair(c, y, w, RowRef("toy", 5)),
        TokenizedPair(b, y, w, RowRef("toy", 6)),
    ]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("packing", [True, False])
def test_shared_prompts_and_replies_give_each_pairs_own_logps_and_gradients(kind, attn, packing):
    lm = model(kind, attn)
    ps = shared_pairs()
    n = 2 * len(ps)
    batch = collate_pairs(ps, range(len(ps)), PAD, packing=packing)
    # 12 output sequences, 9 distinct: a with x, w, y, z; b with z, y, w; c with y, w
    assert batch["canon"].tolist() == [0, 1, 0, 3, 4, 5, 6, 7, 8, 0, 10, 7]
    assert sorted(set(batch["seq"].tolist())) == [0, 1, 3, 4, 5, 6, 7, 8, 10]
    alone = [collate_pairs([p], [0], PAD, packing=packing) for p in ps]
    assert int(batch["tokens"]) == sum(int(b["tokens"]) for b in alone)
    assert int(batch["chosen_tokens"]) == sum(int(b["chosen_tokens"]) for b in alone)
    out = batch_logps(lm, batch, n)
    grads = torch.autograd.grad((out.logps * torch.arange(1.0, n + 1)).sum(), list(lm.parameters()))
    want_logps, want_tokens, want_grads = torch.zeros(n), torch.zeros(n, dtype=torch.long), None
    for i, b in enumerate(alone):
        one = batch_logps(lm, b, 2)
        want_logps[[i, len(ps) + i]] = one.logps.detach()
        want_tokens[[i, len(ps) + i]] = one.num_tokens
        g = torch.autograd.grad(
            one.logps[0] * (i + 1) + one.logps[1] * (len(ps) + i + 1), list(lm.parameters())
        )
        want_grads = g if want_grads is None else [u + v for u, v in zip(want_grads, g, strict=True)]
    torch.testing.assert_close(out.logps.detach(), want_logps, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.num_tokens, want_tokens)
    for x, y in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    if packing:  # a prompt is computed once per segment of its distinct completions
        # a's x, y, z then w: a segment is at most as long as the longest pair (10 tokens), so the
        # rows are no wider than one segment per pair would make them
        assert batch["input_ids"].shape[1] <= max(
            len(p.prompt_ids + p.chosen_ids + p.rejected_ids) for p in ps
        )
        assert int((batch["segment"] >= 0).sum()) == (3 + 3 + 2 + 1) + (3 + 4) + (1 + 1 + 4 + 2) + (4 + 2 + 4)
        assert int((batch["segment"] >= 0).sum()) < sum(int((b["segment"] >= 0).sum()) for b in alone)


def test_packing_fills_rows_up_to_the_longest():
    segs = [sequence_segment(list(range(1, n + 1)), [-100] * n, i) for i, n in enumerate([6, 2, 3, 4, 1])]
    batch = collate(segs, PAD)
    assert batch["input_ids"].shape == (3, 6)  # 6 | 4+2 | 3+1 (first fit, longest first)
    assert int((batch["segment"] >= 0).sum()) == 16
    padded = collate(segs, PAD, packed=False)
    assert padded["input_ids"].shape == (5, 6) and "segment" not in padded


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_pairs_equal_padded_sequences(kind, attn):
    lm = model(kind, attn)
    ps = pairs()
    packed = collate_pairs(ps, range(len(ps)), PAD, packing=True)
    padded = collate_pairs(ps, range(len(ps)), PAD, packing=False)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert int(packed["tokens"]) == int(padded["tokens"])
    n = 2 * len(ps)
    a = batch_logps(lm, packed, n)
    ga = torch.autograd.grad(a.logps.sum(), list(lm.parameters()))
    b = batch_logps(lm, padded, n)
    gb = torch.autograd.grad(b.logps.sum(), list(lm.parameters()))
    assert torch.equal(a.num_tokens, b.num_tokens)
    assert a.num_tokens[1] == 3 and a.num_tokens[len(ps) + 1] == 1  # empty prompt: first token unlabelled
    torch.testing.assert_close(a.logps, b.logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.logits_sum, b.logits_sum, rtol=1e-4, atol=1e-3)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_packed_sft_equals_padded():
    lm = model("llama", "sdpa")
    segs = [
        sequence_segment(list(range(3, 3 + n)), [-100] * (n // 2) + list(range(3 + n // 2, 3 + n)), i)
        for i, n in enumerate([9, 3, 5, 2, 4])
    ]
    a = batch_logps(lm, collate(segs, PAD, packed=True), 5)
    b = batch_logps(lm, collate(segs, PAD, packed=False), 5)
    torch.testing.assert_close(a.logps, b.logps, rtol=1e-5, atol=1e-5)


def test_unsupported_attention_is_refused():
    seg = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ConfigError, match="train.packing: false"):
        attention_mask(seg, seg, "flash_attention_2", torch.float32)


def test_models_that_packing_would_get_wrong_fall_back_to_padding(caplog):
    from transformers import MistralConfig

    assert packing_problem(LlamaConfig(**SMALL)) is None
    assert packing_problem(Qwen2Config(**SMALL)) is None  # sliding window off, as in Qwen2.5
    windowed_config = Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert "sliding_attention" in packing_problem(windowed_config)
    assert "sliding window" in packing_problem(MistralConfig(**SMALL, sliding_window=4))
    assert "flash_attention_2" in packing_problem(
        LlamaConfig(**SMALL, attn_implementation="flash_attention_2")
    )
    windowed = Qwen2ForCausalLM(
        Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    )
    with caplog.at_level("WARNING"):
        assert resolve_packing(windowed, True, "dpo.train.packing") is False
    assert "dpo.train.packing: off for this model" in caplog.text
    ps = pairs()  # reference scoring falls back by itself, and gives the windowed model's own scores
    got, want = score_pairs(windowed, ps, PAD, packing=True), score_pairs(windowed, ps, PAD, packing=False)
    assert torch.equal(got.chosen.logps, want.chosen.logps) and torch.equal(
        got.rejected.logps, want.rejected.logps
    )


def test_reference_scores_are_the_policys_own_at_step_one():
    """Scored in the layout training uses, so the first step's log-ratios are exactly zero."""
    lm = model("llama", "sdpa")
    ps = pairs()
    ref = score_pairs(lm, ps, PAD, micro_batch_size=len(ps))
    lm.train()
    out = batch_logps(lm, collate_pairs(ps, range(len(ps)), PAD), 2 * len(ps))
    assert torch.equal(out.logps[: len(ps)], ref.chosen.logps) and torch.equal(
        out.logps[len(ps) :], ref.rejected.logps
    )
