"""The speed-first settings against the default, whole DPO steps side by side in one process.

Ours on the embedded model in fp32, ``--pairs`` pairs of ``--length`` tokens per sequence in one
micro-batch. Four ways: the default (attention kept, memory returned to the system), the default not
returning memory, projections kept too and not returning memory (the speed-first settings,
``train.keep_projections: true`` and ``train.return_memory: false``), projections kept returning
memory. Returning memory or not changes what the next step finds in the heap, so the ways run in
blocks: ``--per`` steps a way, the first of each block not counted (it settles the heap as that way
leaves it), the ways alternating for ``--rounds`` rounds. Each step's page faults and system time are
printed with its time. Peak memory needs a process per setting: benchmarks/dpo_vs_trl.py (contenders
``ours``, ``ours-fast``).

    .venv/bin/python benchmarks/speed_first.py --length 2048 --rounds 2    # about 12 min
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from dpo_vs_trl import matmul_rate, useful_flops
from side_by_side import one_batch

from criteriapo.models.training import enable_activation_checkpointing

# name -> (keep_projections, return_memory); attention is kept in each
WAYS = {
    "default": (False, True),
    "default, memory kept": (False, False),
    "speed first": (True, False),
    "projections, memory returned": (True, True),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--pairs", type=int, default=1, help="pairs per step")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the ways")
    p.add_argument("--per", type=int, default=3, help="steps a way in each round, the first not counted")
    args = p.parse_args()
    trainer, batch, run = one_batch(args.length, args.pairs, args.rounds * len(WAYS) * args.per + 1)
    trainer.train_step(batch)  # warm-up
    rate = matmul_rate("cpu", torch.float32)
    spent: dict[str, list[float]] = {name: [] for name in WAYS}
    for _ in range(args.rounds):
        for name, (projections, returns) in WAYS.items():
            enable_activation_checkpointing(trainer.model, True, projections)
            trainer.return_memory = returns
            for i in range(args.per):
                before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                trainer.train_step(batch)
                seconds, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
                faults, system = after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime
                print(f"  {name}, step {i}: {seconds:.1f} s, {faults} page faults, {system:.1f} s system")
                if i:
                    spent[name].append(seconds)
    rate = (rate + matmul_rate("cpu", torch.float32)) / 2
    print(
        f"DPO steps, {args.pairs} pair(s) of {args.length} tokens per sequence, {run['positions'][0]} "
        f"positions, {rate / 1e9:.0f} GFLOP/s matmul rate:"
    )
    base = sum(spent["default"])
    for name, times in spent.items():
        util = useful_flops(run, 0) * len(times) / sum(times) / rate
        shown = ", ".join(f"{t:.1f}" for t in times)
        print(f"  {name}: {shown} s; utilisation {util:.1%}; {base / sum(times):.3f}x the default's speed")


if __name__ == "__main__":
    main()
