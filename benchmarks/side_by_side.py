"""Whole DPO steps of ours on the embedded model, several ways side by side in one process.

The machine's speed drifts by a third within minutes, so two settings are compared by alternating
their steps in one process: each way is set (a function of the trainer) before each of its steps,
after one warm-up step each way. Ours with default settings otherwise, ``pairs`` pairs of ``length``
tokens per sequence in one micro-batch; utilisation is over the matmul rate measured before and
after (as benchmarks/dpo_vs_trl.py). Used by benchmarks/flash_backward.py and checkpointing.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from dpo_vs_trl import (
    OURS,
    build_model,
    matmul_rate,
    model_shape,
    ours_trainer,
    pairs_counts,
    rows,
    useful_flops,
)


def one_batch(length: int, pairs: int, steps: int):
    """Ours with default settings on the embedded model in fp32, ``pairs`` pairs of ``length`` tokens
    per sequence in one micro-batch, in training mode for ``steps`` steps: (trainer, the batch's
    indices, the run record :func:`useful_flops` reads, its counts those of the batch)."""
    model, tok = build_model("smollm2", torch.float32, "cpu")
    trainer, encoded, _ = ours_trainer(model, tok, rows(pairs, length), pairs, pairs, steps, OURS["ours"])
    model.train()
    batch = list(range(pairs))
    counts = pairs_counts(encoded, batch)
    return trainer, batch, {**model_shape(model), "ref_in_loop": False, **{k: [v] for k, v in counts.items()}}


def side_by_side(ways: dict[str, Callable[[Any], None]], length: int, pairs: int, steps: int) -> None:
    """Print each way's step times, utilisation and speed against the first way's."""
    trainer, batch, run = one_batch(length, pairs, (steps + 1) * len(ways))
    for set_way in ways.values():  # warm-up
        set_way(trainer)
        trainer.train_step(batch)
    rate = matmul_rate("cpu", torch.float32)
    spent: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(steps):
        for name, set_way in ways.items():
            set_way(trainer)
            t = time.perf_counter()
            trainer.train_step(batch)
            spent[name].append(time.perf_counter() - t)
    rate = (rate + matmul_rate("cpu", torch.float32)) / 2
    print(
        f"DPO steps, {pairs} pair(s) of {length} tokens per sequence, {run['positions'][0]} positions, "
        f"{rate / 1e9:.0f} GFLOP/s matmul rate:"
    )
    first = sum(next(iter(spent.values())))
    for name, times in spent.items():
        shown = ", ".join(f"{t:.1f}" for t in times)
        util = useful_flops(run, 0) * len(times) / sum(times) / rate
        print(f"  {name}: {shown} s; utilisation {util:.1%}; {first / sum(times):.3f}x the first's speed")
