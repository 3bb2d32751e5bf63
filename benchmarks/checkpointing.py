"""What activation checkpointing's recompute costs: whole DPO steps side by side in one process.

Ours on the embedded model (benchmarks/side_by_side.py: ``--pairs`` pairs of ``--length`` tokens per
sequence in one micro-batch, the ways' steps alternating), each block's backward in turn: keeping
attention's outputs (the default), recomputing the whole block (``keep_attention: false``), keeping
the projections' outputs too (``keep_projections: true``: the recompute runs no matmul), and no
checkpointing; each way's speed against the first's. Peak memory needs a process per setting:
benchmarks/scaling.py and dpo_vs_trl.py (contenders ``ours``, ``ours-recompute-attention``,
``ours-keep-projections``).

    .venv/bin/python benchmarks/checkpointing.py --length 2048 --steps 3    # 16 steps, about 8 min
    .venv/bin/python benchmarks/checkpointing.py --ways default,projections --steps 5
"""

from __future__ import annotations

import argparse
from functools import partial

from side_by_side import side_by_side

from criteriapo.models.training import disable_activation_checkpointing, enable_activation_checkpointing

# name -> (keep_attention, keep_projections), or None: no checkpointing. default: attention kept;
# recompute: the whole block recomputed; projections: attention and projections kept
WAYS = {
    "default": (True, False),
    "recompute": (False, False),
    "projections": (True, True),
    "none": None,
}


def set_way(trainer, way: tuple[bool, bool] | None) -> None:
    """Checkpointing as ``way`` has it, and the trainer's return of freed memory after each step as
    it sets it from the config (with checkpointing only: without, it costs page faults)."""
    if way is None:
        disable_activation_checkpointing(trainer.model)
    else:
        enable_activation_checkpointing(trainer.model, *way)
    trainer.return_memory = way is not None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--pairs", type=int, default=1, help="pairs per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps each way, alternating")
    p.add_argument("--ways", default=",".join(WAYS), help=f"some of {', '.join(WAYS)}; the first is the base")
    args = p.parse_args()
    unknown = set(args.ways.split(",")) - set(WAYS)
    if unknown:
        p.error(f"unknown ways {sorted(unknown)}: choose from {', '.join(WAYS)}")
    ways = {name: partial(set_way, way=WAYS[name]) for name in args.ways.split(",")}
    side_by_side(ways, args.length, args.pairs, args.steps)


if __name__ == "__main__":
    main()
