"""One RMSNorm's forward and backward: the module's own against :class:`RMSNormFunction`.

The embedded model's norm (576 wide) over as many positions as one pair of 2048 tokens per sequence
computes (3,070), in float32 on the CPU; each way's forward alone and forward + backward, in
alternating rounds, the median of each. Also the largest difference from a float64 reference, and
the activation memory each keeps for backward (what autograd's saved tensors hold).

    .venv/bin/python benchmarks/rms_norm.py [--positions 3070] [--hidden 576] [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from criteriapo.models.norms import fuse_rms_norms


def saved_bytes(norm: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps from one forward for its backward (the input
    and the weight not counted: they are held anyway)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in (x.data_ptr(), norm.weight.data_ptr()):
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        norm(x)
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--positions", type=int, default=3070)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, args.positions, args.hidden, generator=gen, requires_grad=True)
    grad = torch.randn(1, args.positions, args.hidden, generator=gen)
    stock, fused = LlamaRMSNorm(args.hidden, eps=1e-5), LlamaRMSNorm(args.hidden, eps=1e-5)
    with torch.no_grad():
        stock.weight.uniform_(0.5, 1.5, generator=gen)
        fused.weight.copy_(stock.weight)
    assert fuse_rms_norms(fused) == 1
    ways = {"module's own": stock, "RMSNormFunction": fused}

    def forward(norm):
        with torch.no_grad():
            norm(x)

    def both(norm):
        norm(x).backward(grad)

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds + 1):  # the first round warms up
        for name, norm in ways.items():
            for part, run in (("forward", forward), ("forward + backward", both)):
                t = time.perf_counter()
                run(norm)
                times.setdefault((name, part), []).append(time.perf_counter() - t)
    x64, w64 = x.detach().double().requires_grad_(), stock.weight.detach().double().requires_grad_()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    want.backward(grad.double())
    print(f"RMSNorm, {args.positions} positions x {args.hidden}, float32, {torch.get_num_threads()} threads:")
    for name, norm in ways.items():
        x.grad, norm.weight.grad = None, None
        out = norm(x)
        out.backward(grad)
        errors = [
            (out.double() - want.detach()).abs().max(),
            (x.grad.double() - x64.grad).abs().max(),
            (norm.weight.grad.double() - w64.grad).abs().max(),
        ]
        fwd, both_ms = (
            statistics.median(times[(name, part)][1:]) * 1e3 for part in ("forward", "forward + backward")
        )
        print(
            f"  {name}: forward {fwd:.2f} ms, forward + backward {both_ms:.2f} ms; "
            f"keeps {saved_bytes(norm, x) / 2**20:.2f} MiB for backward; largest error against float64: "
            f"output {errors[0]:.1e}, input grad {errors[1]:.1e}, weight grad {errors[2]:.1e}"
        )


if __name__ == "__main__":
    main()
