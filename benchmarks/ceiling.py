"""How close a DPO step of ours can come to the matmul rate on this machine, from one profiled step.

Ours with default settings on the embedded model in fp32 (``--pairs`` pairs of ``--length`` tokens
per sequence in one micro-batch, as benchmarks/dpo_vs_trl.py): after a warm-up step, one step is
timed and one is profiled. The profiled step's time is split by the ops' own (self) times into the
matrix products, the attention kernels and everything else (element-wise work, copies, the
optimizer, Python). Printed: the utilisation measured, and the utilisation a step would reach

- with everything but matrix products and attention taking no time (the matmuls and attention as
  profiled, recomputation included);
- with, in addition, the matmuls doing only the FLOPs the step needs (no recomputation: the
  non-attention FLOPs of :func:`useful_flops`) at the measured matmul rate, attention as profiled.

The last is a ceiling for any checkpointing policy and any fusion of the element-wise work with these
attention kernels. Utilisation counts as benchmarks/dpo_vs_trl.py does.

    .venv/bin/python benchmarks/ceiling.py --length 2048 --pairs 1    # about 3 min
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from dpo_vs_trl import matmul_rate, useful_flops
from side_by_side import one_batch
from torch.profiler import ProfilerActivity, profile

MATMUL = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}


def kind(op: str) -> str:
    """The part of the step an op's self time belongs to."""
    if op in MATMUL:
        return "matmul"
    if "scaled_dot_product" in op or "flash_attention" in op:
        return "attention"
    return "other"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--pairs", type=int, default=1, help="pairs per step")
    p.add_argument("--top", type=int, default=10, help="the other ops with the most self time shown")
    args = p.parse_args()
    trainer, batch, run = one_batch(args.length, args.pairs, 3)
    trainer.train_step(batch)  # warm-up
    rate = matmul_rate("cpu", torch.float32)
    t = time.perf_counter()
    trainer.train_step(batch)
    step = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        trainer.train_step(batch)
        profiled = time.perf_counter() - t
    rate = (rate + matmul_rate("cpu", torch.float32)) / 2
    spent: dict[str, float] = defaultdict(float)
    others: dict[str, float] = {}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        spent[kind(event.key)] += seconds
        if kind(event.key) == "other":
            others[event.key] = seconds
    useful = useful_flops(run, 0)
    # attention's share of the useful FLOPs: 4 x width per allowed (query, key) pair and layer, x3
    attention = 3 * 4 * run["attention_width"] * run["layers"] * run["attended"][0]
    bound_profiled = spent["matmul"] + spent["attention"]
    bound_ideal = (useful - attention) / rate + spent["attention"]
    print(
        f"DPO step, {args.pairs} pair(s) of {args.length} tokens per sequence, {run['positions'][0]} "
        f"positions, {useful / 1e9:.0f} useful GFLOP ({attention / useful:.0%} attention), "
        f"{rate / 1e9:.0f} GFLOP/s matmul rate"
    )
    print(f"step {step:.1f} s (profiled: {profiled:.1f} s; the split below is the profiled step's)")
    for name in ("matmul", "attention", "other"):
        print(f"  {name}: {spent[name]:.1f} s ({spent[name] / sum(spent.values()):.0%})")
    largest = sorted(others.items(), key=lambda kv: -kv[1])[: args.top]
    print("  largest others: " + ", ".join(f"{op} {seconds:.2f} s" for op, seconds in largest))
    print(f"utilisation measured: {useful / rate / step:.1%}")
    print(f"with everything but matmuls and attention free: {useful / rate / bound_profiled:.1%}")
    print(f"with also no recomputation, matmuls at the measured rate: {useful / rate / bound_ideal:.1%}")


if __name__ == "__main__":
    main()
