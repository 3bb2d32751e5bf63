"""Chunked log-probs equal the full-logits computation, values and gradients."""

from __future__ import annotations

import pytest
import torch

from criteriapo.losses.logprobs import sequence_logps, token_logps


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_token_logps_match_log_softmax(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (7,), generator=g)
    lp, sums = token_logps(h, w, y, chunk=chunk)
    full = torch.log_softmax(h @ w.T, -1).gather(-1, y[:, None]).squeeze(-1)
    torch.testing.assert_close(lp, full)
    torch.testing.assert_close(sums, (h @ w.T).detach().sum(-1))
    gh, gw = torch.autograd.grad(lp.sum(), (h, w))
    eh, ew = torch.autograd.grad(full.sum(), (h, w))
    torch.testing.assert_close(gh, eh)
    torch.testing.assert_close(gw, ew)


def test_sequence_logps_match_model_logits(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 9], [-100, -100, 10, -100, -100]])
    out = sequence_logps(model, ids, mask, labels)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    keep = labels[:, 1:] != -100
    torch.testing.assert_close(out.logps, (lp * keep).sum(1))
    assert out.num_tokens.tolist() == [3, 1]
