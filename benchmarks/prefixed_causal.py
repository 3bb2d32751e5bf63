"""A reply's attention piece on a CPU: a lower-right causal mask against two flash calls merged.

A second reply attends its prompt's keys and then its own causally (see
:mod:`criteriapo.models.attention`). This CPU's flash kernel is causal from the top left only, so a
lower-right mask is materialised and every block of the (reply, prompt + reply) rectangle computed;
:class:`~criteriapo.models.attention.CpuPieces` runs the prompt's keys unmasked and the reply's
own causally and merges them. Forward and backward of one such piece with the embedded model's head
shapes (9 query heads, 3 K/V heads, 64 wide), fp32, alternating, after a warm-up round.

    .venv/bin/python benchmarks/prefixed_causal.py            # replies of 1024 and 2048, about 1 min
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from criteriapo.models.attention import CpuPieces


def with_mask(q, k, v, n):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, 2 * n), enable_gqa=True)


def two_halves(q, k, v, n):
    """The reply as the one piece of a row whose first n positions (the prompt) are keys only."""
    rows = torch.cat([q.new_zeros(q.shape), q], dim=2)
    return CpuPieces.apply(rows, k, v, [[(n, 2 * n, 0, n)]], None)[:, n:]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="1024,2048", help="prompt = reply = this many tokens")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds of both, after a warm-up round")
    args = p.parse_args()
    heads, kv_heads, width = 9, 3, 64
    for n in map(int, args.lengths.split(",")):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, heads, n, width, generator=g).requires_grad_()
        k = torch.randn(1, kv_heads, 2 * n, width, generator=g).requires_grad_()
        v = torch.randn(1, kv_heads, 2 * n, width, generator=g).requires_grad_()
        times = {way: [0.0, 0.0] for way in (with_mask, two_halves)}
        for r in range(args.rounds + 1):
            for way, spent in times.items():
                t = time.perf_counter()
                out = way(q, k, v, n)
                t1 = time.perf_counter()
                out.backward(torch.ones_like(out))
                t2 = time.perf_counter()
                if r:
                    spent[0] += (t1 - t) / args.rounds
                    spent[1] += (t2 - t1) / args.rounds
                q.grad = k.grad = v.grad = None
        (mf, mb), (tf, tb) = times.values()
        print(
            f"reply {n} after a prompt of {n}: lower-right mask {mf * 1e3:.0f} + {mb * 1e3:.0f} ms, two "
            f"halves {tf * 1e3:.0f} + {tb * 1e3:.0f} ms (forward + backward); {(mf + mb) / (tf + tb):.2f}x"
        )


if __name__ == "__main__":
    main()
