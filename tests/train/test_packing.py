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
from criteriapo.train.packing import (
    CHOSEN,
    REJECTED,
    SHARED,
    attention_mask,
    collate,
    packing_problem,
    pair_segment,
    resolve_packing,
    sequence_segment,
)
from criteriapo.train.tasks import collate_pairs, score_pairs

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
    assert torch.equal(got.chosen, want.chosen) and torch.equal(got.rejected, want.rejected)


def test_reference_scores_are_the_policys_own_at_step_one():
    """Scored in the layout training uses, so the first step's log-ratios are exactly zero."""
    lm = model("llama", "sdpa")
    ps = pairs()
    ref = score_pairs(lm, ps, PAD, micro_batch_size=len(ps))
    lm.train()
    out = batch_logps(lm, collate_pairs(ps, range(len(ps)), PAD), 2 * len(ps))
    assert torch.equal(out.logps[: len(ps)], ref.chosen) and torch.equal(out.logps[len(ps) :], ref.rejected)
