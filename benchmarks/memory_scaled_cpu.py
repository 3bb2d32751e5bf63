"""benchmarks/memory_3b.py's accounting checked against the CPU allocator's own figures, on scaled
runs of full-parameter DPO with the settings of configs/llama3.2-3b-24gb.yaml.

Each point builds the Llama 3.2 3B architecture (its widths, heads and 128,256-token vocabulary) with
1 to 3 decoder blocks instead of 28, and runs our trainer as the 24 GB config does: each weight
stepped by AdamW inside backward (no gradients held), gradient checkpointing, the reference scored
once beforehand, log-probs in chunks. Weights are float32, not bfloat16: this machine's CPU has no
bfloat16 arithmetic (a bf16 matrix product runs at about 0.3 GFLOP/s here), so the check is of the
accounting, with 4 bytes where the config has 2, and the full-size figure comes from that accounting.

Measured: the peak of the bytes the CPU allocator holds (its own count, reported to the PyTorch
profiler with ``profile_memory``; each allocation and free in time order), from before the model is
built to after the last step. Predicted: ``memory_3b.gib`` for the same setup.

Run: .venv/bin/python benchmarks/memory_scaled_cpu.py   (about 10 min on 2 cores; prints a table)
"""

from __future__ import annotations

import argparse
import gc
import time

import memory_3b
import torch
from dpo_3b_gpu import ARCHS, pairs
from gpu_precision import PAD, row
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from criteriapo.config import DPOConfig, OptimConfig, TrainConfig
from criteriapo.models.training import disable_dropout, enable_activation_checkpointing
from criteriapo.tracking.loggers import Loggers
from criteriapo.train.loop import Trainer
from criteriapo.train.precision import resolve_precision
from criteriapo.train.scores import score_pairs
from criteriapo.train.tasks import DPOTask

GIB = 1024**3
POINTS = [(1, 128), (2, 128), (3, 128), (2, 256)]  # (decoder blocks, tokens per sequence)
PAIRS = 2  # per step, as the 24 GB config's micro-batch


def peak_allocated(prof) -> int:
    """The most bytes the CPU allocator held at once while ``prof`` recorded (allocations made
    before it started are not counted)."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        held += e.nbytes()  # negative for a free
        peak = max(peak, held)
    return peak


def run_point(blocks: int, length: int, steps: int = 2) -> dict:
    config = LlamaConfig(
        **{**ARCHS["llama3.2-3b"], "num_hidden_layers": blocks}, max_position_embeddings=4096
    )
    prec = resolve_precision("fp32", torch.float32)
    data = pairs(PAIRS * steps, length, config.vocab_size)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        enable_activation_checkpointing(model)
        disable_dropout(model)
        ref = score_pairs(model, data, PAD, PAIRS, precision=prec)
        train = TrainConfig(
            batch_size=PAIRS,
            micro_batch_size=PAIRS,
            max_steps=steps,
            gradient_checkpointing=True,
            precision="fp32",
            optimizer_in_backward=True,
            checkpoint_every=None,
        )
        optim = OptimConfig(lr=5e-7, scheduler="constant", name="adamw", max_grad_norm=None)
        task = DPOTask(DPOConfig(), PAD, config.vocab_size, reference=ref)
        trainer = Trainer(model, task, data, optim, train, Loggers([]), precision=prec)
        losses = [trainer.train_step(trainer.order.next_batch(PAIRS))["loss"] for _ in range(steps)]
        trainer.optimizer.close()
        del trainer, model, ref
        gc.collect()
    measured = peak_allocated(prof)
    p, c = length // 2, length - length // 2
    # the accounting's tokens: our packed pair computes its prompt once (p + 2c positions)
    setup = memory_3b.Setup("scaled", "dpo", 1, False, PAIRS, (p + 2 * c) / 2, True, "fp32", True)
    predicted = memory_3b.gib(config, setup)
    return {
        "blocks": blocks,
        "length": length,
        "measured_gib": measured / GIB,
        "predicted_gib": predicted["total"],
        "predicted": predicted,
        "losses": losses,
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    print(
        row(["decoder blocks", "pairs x tokens per sequence", "measured GiB", "predicted GiB", "error", "s"])
    )
    print("|---" * 6 + "|")
    results = []
    for blocks, length in POINTS:
        r = run_point(blocks, length)
        results.append(r)
        err = r["predicted_gib"] / r["measured_gib"] - 1
        print(
            row(
                [
                    str(blocks),
                    f"{PAIRS} x {length}",
                    f"{r['measured_gib']:.3f}",
                    f"{r['predicted_gib']:.3f}",
                    f"{err:+.1%}",
                    f"{r['seconds']:.0f}",
                ]
            ),
            flush=True,
        )
    full = LlamaConfig(**ARCHS["llama3.2-3b"], max_position_embeddings=4096)
    for name, s in [
        ("the 24 GB config (2 pairs, 1024 + 1024 + 1024 positions)", ("dpo", 2, 1536, "bf16-true")),
        ("the GPU check's run (4 pairs, 1024 + 512 + 512 positions)", ("dpo", 4, 1024, "bf16-true")),
    ]:
        stage, mb, length, precision = s
        g = memory_3b.gib(full, memory_3b.Setup(name, stage, 1, False, mb, length, True, precision, True))
        print(f"\nLlama 3.2 3B, 28 blocks, bf16, {name}: predicted {g['total']:.2f} GiB")


if __name__ == "__main__":
    main()
