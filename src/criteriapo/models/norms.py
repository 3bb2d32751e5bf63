"""RMSNorm in fewer passes over memory, for training on a CPU in float32.

A Llama-style RMSNorm (``weight * (x * rsqrt(mean(x^2) + eps))``) runs as about six element-wise
ops forward, and autograd's backward for them as about a dozen more, each a pass over a
(positions, hidden) tensor; on a CPU these are bound by memory. :class:`RMSNormFunction` computes the
same forward with the same ops in the same order (so the same values, bit for bit) and writes its
backward out in about half the passes. It saves the input and one float per position, where autograd
keeps the normalised input as well.

:func:`fuse_rms_norms` switches a model's norms to it, each one only after checking on a probe that
the module's own forward computes exactly this (Gemma's ``1 + weight``, a norm with a bias or a
gate, or one that rounds in another order keeps its own forward). The switched forward takes this
path for float32 inputs and weights on a CPU, and the module's own forward for anything else.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.autograd.function import once_differentiable
from torch.distributed.tensor import DTensor


class RMSNormFunction(torch.autograd.Function):
    """x (..., H), weight (H,) -> weight * (x * rsqrt(mean(x^2, -1) + eps)).

    With r = rsqrt(mean(x^2) + eps) per position and g the output's gradient:
    dweight_j = sum_i r_i g_ij x_ij, and dx = r (g w - x r^2 sum_j(g_j w_j x_j) / H)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, r)
        return (x * r).mul_(weight)

    @staticmethod
    @once_differentiable  # a second derivative would miss the path through r: refused, not wrong
    def backward(ctx, grad: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        hidden = x.shape[-1]
        x2, g2, r2 = x.reshape(-1, hidden), grad.reshape(-1, hidden), r.reshape(-1, 1)  # (M, H), (M, 1)
        gx = g2 * x2
        dx = dweight = None
        if ctx.needs_input_grad[0]:
            row = gx.mv(weight).unsqueeze(1).mul_(r2 * r2 / hidden)  # (M, 1): r^2 sum_j g w x / H
            dx = (g2 * weight).sub_(x2 * row).mul_(r2).view_as(x)
        if ctx.needs_input_grad[1]:  # summed as autograd sums it (a matrix product's order loses ~4x)
            dweight = gx.mul_(r2).sum(0)  # sum_i r_i g_ij x_ij
        return dx, dweight, None


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Switch every RMSNorm of ``model`` whose forward is exactly :class:`RMSNormFunction`'s (checked
    on a probe, :func:`_plain_rms_norm`) to it. Returns how many were switched."""
    switched = 0
    for module in model.modules():
        if _plain_rms_norm(module):
            module.forward = partial(_forward, module)  # (pickles by name, as a bound method would not)
            switched += 1
    return switched


def _eps(module: torch.nn.Module) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return eps if isinstance(eps, float) else None


def _plain_rms_norm(module: torch.nn.Module) -> bool:
    """Whether ``module`` is an RMSNorm whose own forward gives, bit for bit, what
    :class:`RMSNormFunction` gives on a float32 probe: random rows at scales where eps decides the
    result and where it does not, and a zero row (so a norm that ignores eps, or adds it elsewhere,
    fails), with its weight and with a random one (so ``1 + weight`` or ``abs(weight)`` cannot pass by
    the weight it happens to have). A forward that fails on the probe keeps its own."""
    weight = getattr(module, "weight", None)
    eps = _eps(module)
    if not type(module).__name__.endswith("RMSNorm") or "forward" in vars(module) or eps is None:
        return False
    if not isinstance(weight, torch.nn.Parameter) or isinstance(weight, DTensor) or weight.dim() != 1:
        return False
    if weight.device.type != "cpu" or dict(module.named_parameters()).keys() != {"weight"}:
        return False
    if list(module.buffers()):
        return False
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, 1e3, 1e-3, eps**0.5, eps, 0.0]).repeat_interleave(2)  # two rows each
    probe = torch.randn(len(scales), weight.shape[0], generator=generator) * scales[:, None]
    probe = probe.view(2, -1, weight.shape[0])
    weights = (weight.detach().float(), torch.randn(weight.shape[0], generator=generator))
    try:
        with torch.no_grad():
            for w in weights:
                own = torch.func.functional_call(module, {"weight": w}, (probe,))
                ours = RMSNormFunction.apply(probe, w, eps)
                if not isinstance(own, torch.Tensor) or not torch.equal(own, ours):
                    return False
    except Exception:  # noqa: BLE001 (a forward that cannot take the probe is not switched)
        return False
    return True


def _forward(self: torch.nn.Module, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A switched norm's forward: :class:`RMSNormFunction` for float32 on a CPU, else its own."""
    fp32 = hidden.dtype == torch.float32 and self.weight.dtype == torch.float32
    if fp32 and not args and not kwargs and hidden.device.type == "cpu" and self.weight.device.type == "cpu":
        return RMSNormFunction.apply(hidden, self.weight, _eps(self))
    return type(self).forward(self, hidden, *args, **kwargs)
