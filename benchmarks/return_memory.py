"""What returning freed memory to the system costs and saves: ours on the embedded model, default
settings (gradient checkpointing, so the trainer returns memory), ``--pairs`` pairs of ``--length``
tokens per sequence in one micro-batch.

Three ways: ``backward`` (the default: after each step and four times within backward,
:func:`~criteriapo.train.loop._return_memory_in_backward`), ``step`` (after each step only) and
``none``. Memory: each way in a process of its own (the peak RSS is a process's), printed after every
step, since the heap's high-water mark creeps up over the first steps. Speed with ``--speed``: the
ways in one process, in blocks of one settling step (which leaves the heap as that way leaves it)
and two timed steps, alternating.

    .venv/bin/python benchmarks/return_memory.py --length 200 --pairs 4 --steps 5    # about 3 min
    .venv/bin/python benchmarks/return_memory.py --length 2048 --speed --rounds 2    # over 15 min
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch
from dpo_vs_trl import OURS, build_model, ours_trainer, rows

from criteriapo.train import loop

WAYS = ("backward", "step", "none")


def set_way(trainer, way: str) -> None:
    trainer.return_memory = way == "backward"


def step(trainer, batch: list[int], way: str) -> float:
    """One step the way ``way`` has it; its seconds."""
    t = time.perf_counter()
    trainer.train_step(batch)
    if way == "step":  # what the trainer does after a step, without its returns within backward
        loop._return_free_memory(trainer.device)
    return time.perf_counter() - t


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def trainer_for(length: int, pairs: int):
    model, tok = build_model("smollm2", torch.float32, "cpu")
    trainer, _, _ = ours_trainer(model, tok, rows(pairs, length), pairs, pairs, 1000, OURS["ours"])
    model.train()
    return trainer


def one_way(way: str, length: int, pairs: int, steps: int) -> None:
    trainer, batch = trainer_for(length, pairs), list(range(pairs))
    set_way(trainer, way)
    peaks, times = [], []
    for _ in range(steps):
        times.append(step(trainer, batch, way))
        peaks.append(peak_gib())
    shown = ", ".join(f"{p:.3f}" for p in peaks)
    print(f"  {way}: peak RSS after each step {shown} GiB; steps {', '.join(f'{t:.1f}' for t in times)} s")


def speed(length: int, pairs: int, rounds: int) -> None:
    trainer, batch = trainer_for(length, pairs), list(range(pairs))
    spent: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(rounds):
        for way in WAYS:
            set_way(trainer, way)
            step(trainer, batch, way)  # settles the heap as this way leaves it
            spent[way] += [step(trainer, batch, way) for _ in range(2)]
    base = sum(spent[WAYS[0]])
    print(f"Whole steps, {pairs} pair(s) of {length} tokens per sequence, ways alternating in one process:")
    for way, times in spent.items():
        shown = ", ".join(f"{t:.1f}" for t in times)
        print(f"  {way}: {shown} s; {base / sum(times):.3f}x the speed of {WAYS[0]}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=200, help="tokens per sequence")
    p.add_argument("--pairs", type=int, default=4, help="pairs per step")
    p.add_argument("--steps", type=int, default=5, help="steps per way (memory)")
    p.add_argument("--speed", action="store_true", help="time the ways side by side instead")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the ways (speed)")
    p.add_argument("--one", choices=WAYS, help=argparse.SUPPRESS)  # a child process: one way's memory
    args = p.parse_args()
    if args.one:
        one_way(args.one, args.length, args.pairs, args.steps)
    elif args.speed:
        speed(args.length, args.pairs, args.rounds)
    else:
        print(f"Peak memory, {args.pairs} pair(s) of {args.length} tokens per sequence, a process per way:")
        shared = ["--length", str(args.length), "--pairs", str(args.pairs), "--steps", str(args.steps)]
        for way in WAYS:
            command = [sys.executable, __file__, "--one", way, *shared]
            out = subprocess.run(command, check=False, capture_output=True, text=True)
            if out.returncode:
                print(f"  {way}: failed\n{out.stderr[-2000:]}")
            print(out.stdout, end="")


if __name__ == "__main__":
    main()
