"""Piece attention (criteriapo.models.attention) computes what SDPA with the full packed mask
computes, values and gradients, and a packed batch on an SDPA model really goes through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from criteriapo.losses.logprobs import batch_logps
from criteriapo.models import attention
from criteriapo.models.attention import PIECES, avoid_cudnn, piece_attention, use_pieces
from criteriapo.rows.packing import (
    MASK_IMPLEMENTATIONS,
    attention_mask,
    attention_pieces,
    collate,
    pair_segment,
    prompt_segment,
    sequence_segment,
)
from tests.train.test_loop import tiny_model


class Heads(torch.nn.Module):
    """What transformers' attention functions read from the module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def segments():
    """Pairs with and without a prompt, a prompt with three completions and a plain sequence, so
    rows mix every kind of piece and end in padding."""
    return [
        pair_segment([5, 6, 7, 8], [9, 10, 11], [12, 13], 0, 1),
        pair_segment([], [9, 10], [12, 13, 14], 2, 3),
        prompt_segment([5, 6], [([7, 8], 4), ([9], 5), ([10, 11, 12], 6)]),
        sequence_segment([3, 4, 5, 6, 7], [-100, 4, 5, 6, 7], 7),
        pair_segment([5], [9], [12], 8, 9),
    ]


def test_pieces_follow_the_segments():
    batch = collate(
        [pair_segment([5, 6, 7], [8, 9], [10, 11, 12], 0, 1), pair_segment([], [8], [10, 11], 2, 3)], 0
    )
    # row 0: prompt + chosen causal, rejected after the prompt; row 1: each completion alone, then padding
    assert attention_pieces(batch["segment"], batch["branch"]) == [
        [(0, 5, 0, 0), (5, 8, 0, 3)],
        [(0, 1, 0, 0), (1, 3, 1, 1)],
    ]
    assert batch["segment"][1].tolist()[3:] == [-1] * 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kv_heads", "groups"), [(2, 1), (2, 3), (3, 3)])
@pytest.mark.parametrize("halved", [False, True])
def test_piece_attention_equals_sdpa_with_the_full_mask(dtype, kv_heads, groups, halved, monkeypatch):
    """Also with every CPU flash backward run as two halves of its rows (rows of odd and even length,
    windows that share a row), as an odd number of heads on an even number of threads runs them."""
    monkeypatch.setattr(attention, "halving_helps", lambda heads, rows, threads: halved and rows >= 2)
    batch = collate(segments(), 0, packed=True)
    seg, branch = batch["segment"], batch["branch"]
    rows, length = seg.shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, kv_heads * groups, length, 8, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(rows, kv_heads, length, 8, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(rows, kv_heads, length, 8, generator=g, dtype=dtype).requires_grad_()
    heads = Heads(groups)
    got, _ = piece_attention(heads, q, k, v, None, pieces=attention_pieces(seg, branch))
    mask = attention_mask(seg, branch, "sdpa", dtype)
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=mask
    ).transpose(1, 2)
    real = (seg >= 0)[:, :, None, None]  # padding's output is read by nothing
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(got * real, want * real, **tol)
    assert not got.masked_select(~real).any()  # padding's output is zeros
    dout = torch.randn(got.shape, generator=g, dtype=dtype) * real
    grads = torch.autograd.grad(got, (q, k, v), dout)
    wants = torch.autograd.grad(want, (q, k, v), dout)
    for a, b in zip(grads, wants, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_backward_is_halved_when_that_evens_out_the_threads():
    # the kernel gives each thread whole (batch, head) pairs: 9 heads on 2 threads is 5 rounds, 18
    # half-length ones 9 rounds of half the length
    assert attention.halving_helps(9, 2048, 2)
    assert attention.halving_helps(5, 2048, 4)  # 2 rounds against 3 of half the length
    assert not attention.halving_helps(8, 2048, 2)  # already even
    assert not attention.halving_helps(9, 2048, 1)
    assert not attention.halving_helps(9, 2048, 16)  # one round either way
    assert not attention.halving_helps(9, attention.HALVE_ROWS - 1, 2)  # halves too short for the kernel


def test_without_pieces_it_is_transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 6, 8, generator=g) for h in (4, 2, 2))
    got, _ = piece_attention(Heads(2), q, k, v, None, scaling=0.3)
    want, _ = sdpa_attention_forward(Heads(2), q, k, v, None, scaling=0.3)
    assert torch.equal(got, want)


def tiny(attn: str) -> LlamaForCausalLM:
    model = tiny_model()
    model.set_attn_implementation(attn)
    return model


def test_a_packed_batch_on_an_sdpa_model_is_computed_by_pieces(monkeypatch):
    """The fast path is taken, not silently skipped: the model is set to it on the first packed
    batch, every layer computes by piece, and the log-probs are those of the full mask (the same
    weights under eager attention)."""
    assert PIECES in MASK_IMPLEMENTATIONS
    model = tiny("sdpa")
    calls = []
    pieces = attention.CpuPieces.apply
    monkeypatch.setattr(attention.CpuPieces, "apply", lambda *a: calls.append(1) or pieces(*a))
    packed = collate(segments(), 0, packed=True)
    n = 10
    got = batch_logps(model, packed, n)
    assert model.config._attn_implementation == PIECES
    assert len(calls) == model.config.num_hidden_layers  # one node a layer takes every row's pieces
    want = batch_logps(tiny("eager"), packed, n)
    torch.testing.assert_close(got.logps, want.logps, atol=1e-4, rtol=1e-5)


def test_other_attention_is_left_alone():
    model = tiny("eager")
    assert use_pieces(model) is False
    assert model.config._attn_implementation == "eager"


def test_an_exported_model_keeps_no_trace_of_pieces(tmp_path):
    model = tiny("sdpa")
    assert use_pieces(model)
    model.save_pretrained(tmp_path)
    assert "criteriapo" not in (tmp_path / "config.json").read_text()


def test_cudnn_is_kept_from_masked_backward_passes_on_a_gpu():
    assert avoid_cudnn("cuda", masked=True)
    assert not avoid_cudnn("cuda", masked=False)  # is_causal: flash or cuDNN without a mask
    assert not avoid_cudnn("cpu", masked=True)
    with torch.no_grad():  # generation: no backward, no NaN to fear
        assert not avoid_cudnn("cuda", masked=True)
