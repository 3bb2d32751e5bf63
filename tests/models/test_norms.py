"""RMSNorm with its backward written out: the module's own forward bit for bit, its gradients, and
only the norms that compute exactly that switched."""

from __future__ import annotations

import copy as copy_module
import io

import pytest
import torch

from criteriapo.models.norms import RMSNormFunction, fuse_rms_norms
from criteriapo.models.training import enable_activation_checkpointing
from tests.zoo import VOCAB, ZOO, zoo_model

IDS = torch.randint(3, VOCAB - 4, (2, 12), generator=torch.Generator().manual_seed(0))
# how many norms each architecture has that compute weight * x * rsqrt(mean(x^2) + eps): two a block
# and the final one, and Qwen3's and OLMo 2's query and key norms; Gemma's scale by 1 + weight, the
# others use LayerNorm
NONE = ("gemma", "gemma2", "gemma3_text", "gemma3", "phi", "cohere", "gpt2", "opt")
SWITCHED = {"qwen3": 9, "olmo2": 9, **dict.fromkeys(NONE, 0)}


def test_the_written_out_backward_is_the_derivative():
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(RMSNormFunction.apply, (x, weight, 1e-6))
    frozen = weight.detach()  # a frozen weight (LoRA, a reference) gets no gradient
    assert torch.autograd.gradcheck(lambda x: RMSNormFunction.apply(x, frozen, 1e-6), (x,))
    fixed = x.detach()  # the first norm's input when the embeddings are frozen
    assert torch.autograd.gradcheck(lambda w: RMSNormFunction.apply(fixed, w, 1e-6), (weight,))


class NoEpsRMSNorm(torch.nn.Module):
    """Names an eps it never adds: equal to the plain norm wherever mean(x^2) >> eps."""

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = 1e-8

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)))


class GatedRMSNorm(torch.nn.Module):
    """Needs a second input: the probe cannot run it."""

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = 1e-6

    def forward(self, x, gate):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)) * gate


def test_norms_that_compute_anything_else_keep_their_own_forward():
    assert fuse_rms_norms(torch.nn.ModuleList([NoEpsRMSNorm(16), GatedRMSNorm(16)])) == 0


def _logits_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(input_ids=IDS).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(grad: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Equal up to float32 rounding at the tensor's scale (sums in another order)."""
    assert (grad - want).abs().max() <= 1e-5 * want.abs().max(), name


@pytest.mark.parametrize("arch", ZOO)
def test_switched_models_compute_their_own_forward_and_its_gradients(arch):
    model = zoo_model(arch).eval()  # no dropout
    with torch.no_grad():  # trained norm weights, not the ones of a fresh model
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.uniform_(0.5, 1.5)
    want, want_grads = _logits_and_grads(model)
    assert fuse_rms_norms(model) == SWITCHED.get(arch, 5)
    logits, grads = _logits_and_grads(model)
    assert torch.equal(logits, want)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        _close(grad, want_grads[name], name)
    assert fuse_rms_norms(model) == 0  # a switched norm is not switched again


def test_a_switched_model_copies_and_pickles_as_switched():
    model = zoo_model("llama").eval()
    fuse_rms_norms(model)
    want = model(input_ids=IDS).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copy in (copy_module.deepcopy(model), torch.load(buffer, weights_only=False)):
        norms = [m for m in copy.modules() if type(m).__name__ == "LlamaRMSNorm"]
        assert all(m.forward.args == (m,) for m in norms)  # bound to the copy, not the original
        assert torch.equal(copy(input_ids=IDS).logits, want)


def test_with_checkpointing_that_keeps_projections_the_gradients_are_those_without():
    plain = zoo_model("llama")
    want, want_grads = _logits_and_grads(plain)
    model = zoo_model("llama")
    fuse_rms_norms(model)
    enable_activation_checkpointing(model, keep_attention=True, keep_projections=True)
    model.train()
    logits, grads = _logits_and_grads(model)
    assert torch.equal(logits, want)
    for name, grad in grads.items():
        _close(grad, want_grads[name], name)


def test_other_dtypes_take_the_modules_own_forward():
    model = zoo_model("llama").to(torch.bfloat16)
    want = model(input_ids=IDS).logits
    assert fuse_rms_norms(model) == 5
    made = []  # the autograd node each norm's output came from
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.register_forward_hook(lambda m, i, out: made.append(type(out.grad_fn).__name__))
    assert torch.equal(model(input_ids=IDS).logits, want)
    assert made and "RMSNormFunctionBackward" not in made
    made.clear()
    model.float()(input_ids=IDS)
    assert made == ["RMSNormFunctionBackward"] * 5
