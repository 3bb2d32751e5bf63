"""The chunked output layer's log-probs and gradients: equal to the stock ops', with each transform a
model applies to its logits, and the weight's gradient made in the weight's own layout, so that a
tied embedding's gradient is added to it in place (two copies of the weight's size at once at the
end of backward, not three), counted by the CPU allocator itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from criteriapo.losses.logprobs import LogitTransform, token_logps


def _tied(vocab: int, hidden: int, n: int, dtype: torch.dtype, bias: bool):
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter((torch.randn(vocab, hidden, generator=g) * 0.05).to(dtype))
    b = torch.nn.Parameter((torch.randn(vocab, generator=g) * 0.05).to(dtype)) if bias else None
    x = torch.randint(0, vocab, (n,), generator=g)
    y = torch.randint(0, vocab, (n,), generator=g)
    return w, b, x, y


def _grads(w, b, x, y, logps):
    """The log-probs of ``logps`` (h, w, y, b) and the gradients of a weighted sum of them."""
    h = F.embedding(x, w) * 1.5
    lp = logps(h, w, y, b)
    (lp * torch.linspace(-1, 1, len(lp))).sum().backward()
    out = [lp.detach(), w.grad, *([b.grad] if b is not None else [])]
    w.grad = None
    if b is not None:
        b.grad = None
    return out


def _stock(transform: LogitTransform):
    """The whole (n, V) logits through the stock ops with autograd, transformed as a model does."""

    def logps(h, w, y, b):
        logits = F.linear(h, w, b) * transform.multiplier / transform.divisor
        logits = logits.float()
        if transform.softcap:
            logits = transform.softcap * torch.tanh(logits / transform.softcap)
        return logits.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)

    return logps


TRANSFORMS = [
    LogitTransform(),
    LogitTransform(multiplier=0.0625),  # Cohere's logit scale
    LogitTransform(divisor=8.0),  # Granite's logits scaling
    LogitTransform(softcap=2.0),  # Gemma 2's final soft cap
]


@pytest.mark.parametrize("transform", TRANSFORMS, ids=["plain", "multiplied", "divided", "softcapped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_the_stock_ops(dtype, bias, transform):
    w, b, x, y = _tied(300, 16, 600, dtype, bias)  # 3 chunks of 256 positions, the last one short
    ours = _grads(w, b, x, y, lambda h, w, y, b: token_logps(h, w, y, bias=b, transform=transform)[0])
    assert ours[1].is_contiguous()
    stock = _grads(w, b, x, y, _stock(transform))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for got, want in zip(ours, stock, strict=True):
        torch.testing.assert_close(got, want, **tol)


def test_without_gradients_the_values_are_the_same():
    w, b, x, y = _tied(300, 16, 600, torch.float32, True)
    h = F.embedding(x, w) * 1.5
    with_grad, sums = token_logps(h, w, y, bias=b)
    with torch.no_grad():
        without, sums_without = token_logps(h, w, y, bias=b)
    assert with_grad.requires_grad and not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)
    torch.testing.assert_close(sums_without, sums, rtol=0, atol=0)
    torch.testing.assert_close(sums, F.linear(h, w, b).detach().sum(-1))


def test_under_autocast_the_stock_path_gives_the_same_gradients():
    w, _, x, y = _tied(300, 16, 600, torch.float32, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _grads(w, None, x, y, lambda h, w, y, b: token_logps(h, w, y)[0])
        stock = _grads(w, None, x, y, _stock(LogitTransform()))
    assert ours[1].dtype == torch.float32
    for got, want in zip(ours, stock, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_a_tied_weight_holds_two_gradients_of_its_size_at_most():
    vocab, hidden = 50_000, 2048  # a 400 MB weight; a chunk of logits is an eighth of it
    w, _, x, y = _tied(vocab, hidden, 600, torch.float32, False)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        lp, _ = token_logps(F.embedding(x, w) * 1.0, w, y)
        lp.sum().backward()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        held += e.nbytes()
        peak = max(peak, held)
    size = w.numel() * w.element_size()
    # the stock linear's transposed gradient cannot be added to in place: 3 weights' worth at the end
    assert 2 * size <= peak < 2.5 * size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "arch, extra",
    [
        ("llama", {"tie_word_embeddings": True}),
        ("qwen2", {}),
        ("gemma2", {}),  # tied, with a final soft cap
        ("phi", {}),  # an output layer with a bias
        ("granite", {}),  # logits divided by a scale
    ],
)
def test_gradients_equal_those_of_the_models_own_forward(arch, extra, dtype):
    from criteriapo.losses.logprobs import sequence_logps
    from tests.zoo import VOCAB, zoo_model

    model = zoo_model(arch, **extra).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 14), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :8] = -100  # a prompt of 8 tokens, a reply of 6
    weights = torch.tensor([1.0, -0.5])
    params = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad((sequence_logps(model, ids, mask, labels).logps * weights).sum(), params)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    tokens = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    own = (tokens * (labels[:, 1:] != -100)).sum(-1)
    theirs = torch.autograd.grad((own * weights).sum(), params)
    for a, b in zip(ours, theirs, strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        else:  # bf16 rounds each path its own way: the same direction and size
            cos = torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0)
            assert cos > 0.99 and abs(a.float().norm() / b.float().norm() - 1) < 0.05
