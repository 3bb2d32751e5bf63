"""The CPU flash kernel's backward as it comes against rows halved into a batch of two.

The kernel gives each thread whole (batch, head) pairs, so the embedded model's 9 query heads on 2
threads take 5 heads' time; :func:`~criteriapo.models.attention.flash_backward` runs the rows as two
halves when that evens the threads out. Backward of the pieces a DPO pair of 2048 tokens per
sequence makes (the prompt with the first reply, causal; the second reply after the prompt, as
:class:`~criteriapo.models.attention.CpuPieces` runs it: the prompt's keys unmasked and its own
causally), with 9 query heads, 3 K/V heads, 64 wide, fp32, alternating after a warm-up round.
With ``--steps``, also whole DPO steps of ours on the embedded model, halving on and off in turn
in one process (benchmarks/side_by_side.py: ``--pairs`` pairs of ``--length`` tokens per sequence in
one micro-batch, a warm-up step each way, the utilisation over the matmul rate measured before and
after).

    .venv/bin/python benchmarks/flash_backward.py            # about 1 min on 2 cores
    .venv/bin/python benchmarks/flash_backward.py --steps 3 --length 2048    # and 8 steps, 6 min
"""

from __future__ import annotations

import argparse
import time

import torch
from side_by_side import side_by_side

from criteriapo.models import attention
from criteriapo.models.attention import _flash, _flash_backward, flash_backward


def pieces(prompt: int, reply: int) -> list[tuple[str, int, int, bool]]:
    """(name, rows, keys, causal): the backward calls of one pair's attention in a layer."""
    return [
        (f"prompt + first reply ({prompt + reply}, causal)", prompt + reply, prompt + reply, True),
        (f"second reply over the prompt ({reply} x {prompt})", reply, prompt, False),
        (f"second reply over itself ({reply}, causal)", reply, reply, True),
    ]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompt", type=int, default=1034)
    p.add_argument("--reply", type=int, default=1018)
    p.add_argument(
        "--rounds", type=int, default=6, help="timed rounds of both, after a warm-up round; 0: none"
    )
    p.add_argument("--steps", type=int, default=0, help="then this many DPO steps each way, alternating")
    p.add_argument("--length", type=int, default=2048, help="tokens per sequence of --steps' pairs")
    p.add_argument("--pairs", type=int, default=1, help="pairs per step of --steps")
    args = p.parse_args()
    if args.rounds:
        kernels(args)
    if args.steps:
        steps(args)


def kernels(args) -> None:
    heads, kv_heads, width = 9, 3, 64
    total = {"as it comes": 0.0, "halved": 0.0}
    for name, queries, keys, causal in pieces(args.prompt, args.reply):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, heads, queries, width, generator=g)
        k, v = (torch.randn(1, kv_heads, keys, width, generator=g) for _ in range(2))
        out, lse = _flash(q, k, v, is_causal=causal)
        grad = torch.randn(out.shape, generator=g)
        spent = dict.fromkeys(total, 0.0)
        for r in range(args.rounds + 1):
            for way in spent:
                t = time.perf_counter()
                if way == "halved":
                    flash_backward(grad, q, k, v, out, lse, causal, None)
                else:
                    _flash_backward(grad, q, k, v, out, lse, 0.0, causal)
                if r:
                    spent[way] += (time.perf_counter() - t) / args.rounds
        for way in total:
            total[way] += spent[way]
        a, b = spent.values()
        print(f"{name}: as it comes {a * 1e3:.0f} ms, halved {b * 1e3:.0f} ms; {a / b:.2f}x")
    a, b = total.values()
    threads = torch.get_num_threads()
    print(f"all three ({threads} threads): {a * 1e3:.0f} ms against {b * 1e3:.0f} ms; {a / b:.2f}x")


def steps(args) -> None:
    real = attention.halving_helps

    def halving(on: bool):
        def set_way(trainer) -> None:
            attention.halving_helps = real if on else (lambda *a: False)

        return set_way

    try:
        side_by_side(
            {"halved": halving(True), "as it comes": halving(False)}, args.length, args.pairs, args.steps
        )
    finally:
        attention.halving_helps = real


if __name__ == "__main__":
    main()
