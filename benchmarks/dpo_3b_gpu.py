"""Full-parameter against LoRA DPO of the Llama 3.2 3B architecture (random weights), one GPU.

For each mode, a few DPO steps through our trainer with the reference *held in memory* (a frozen
copy for full parameters; the adapters switched off for LoRA), bf16 weights, gradient checkpointing
as chosen; prints and writes tokens/s (non-padding chosen + rejected tokens, after warm-up) and
peak allocated memory to benchmarks/results/dpo_3b_gpu.{json,md}, with the machine described.

    .venv/bin/python benchmarks/dpo_3b_gpu.py                      # on a GPU machine
    .venv/bin/python benchmarks/dpo_3b_gpu.py --arch tiny --device cpu --steps 2   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from criteriapo.config import DPOConfig, LoraConfig, OptimConfig, TrainConfig
from criteriapo.data.records import RowRef
from criteriapo.data.tokenize import TokenizedPair
from criteriapo.models.lora import apply_lora
from criteriapo.models.training import enable_activation_checkpointing
from criteriapo.tracking.loggers import Loggers
from criteriapo.train.loop import Trainer
from criteriapo.train.tasks import DPOTask

ARCHS = {
    "llama3.2-3b": {
        "vocab_size": 128256,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": True,
    },
    "llama3.2-1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
    },
    "tiny": {
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
}


def pairs(n: int, length: int, vocab: int, seed: int = 0) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)
    prompt, completion = length // 2, length - length // 2
    return [
        TokenizedPair(
            torch.randint(3, vocab, (prompt,), generator=g).tolist(),
            torch.randint(3, vocab, (completion,), generator=g).tolist(),
            torch.randint(3, vocab, (completion,), generator=g).tolist(),
            RowRef("synthetic", i + 1),
        )
        for i in range(n)
    ]


def run(mode: str, args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = LlamaConfig(**ARCHS[args.arch], max_position_embeddings=max(4096, args.length))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:
        model = LlamaForCausalLM(config).to(dtype)
    if args.checkpointing:
        enable_activation_checkpointing(model)
    if mode == "lora":
        model = apply_lora(model, LoraConfig(enabled=True, r=16, alpha=32))
        ref = model  # adapters off
    else:
        with device:
            ref = LlamaForCausalLM(config).to(dtype).eval().requires_grad_(False)
        ref.load_state_dict(model.state_dict())
    data = pairs(args.batch * (args.steps + 1), args.length, config.vocab_size)
    cfg = DPOConfig(precompute_ref_log_probs=False)
    train = TrainConfig(batch_size=args.batch, micro_batch_size=args.micro, max_steps=args.steps + 1)
    lr = 5e-6 if mode == "lora" else 5e-7
    trainer = Trainer(
        model, DPOTask(cfg, 0, config.vocab_size, ref_model=ref), data, OptimConfig(lr=lr), train, Loggers([])
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens, seconds, first_loss = 0, 0.0, None
    for step in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        m = trainer.train_step(trainer.order.next_batch(args.batch))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step == 0:
            first_loss = m["loss"]
            continue  # warm-up
        seconds += time.perf_counter() - t0
        tokens += 2 * args.batch * args.length
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"mode": mode, "tokens_per_second": tokens / seconds, "peak_gib": peak, "step1_loss": first_loss}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="llama3.2-3b", choices=list(ARCHS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--length", type=int, default=1024, help="tokens per sequence (prompt + completion)")
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--micro", type=int, default=4, help="pairs per forward")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    results = [run(mode, args) for mode in ("full", "lora")]
    machine = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    full, lora = results
    summary = {
        "arch": args.arch,
        "length": args.length,
        "batch": args.batch,
        "micro": args.micro,
        "checkpointing": args.checkpointing,
        "machine": machine,
        "results": results,
        "lora_speedup": lora["tokens_per_second"] / full["tokens_per_second"],
    }
    lines = [
        (
            f"DPO, {args.arch} (random weights), {args.batch} pairs x {args.length} tokens per step, "
            f"reference in memory, on {machine['device']}"
        ),
        "",
        "| mode | tokens/s | peak GiB |",
        "|---|---|---|",
        *(f"| {r['mode']} | {r['tokens_per_second']:.0f} | {r['peak_gib']:.1f} |" for r in results),
        "",
        f"LoRA / full tokens/s: {summary['lora_speedup']:.2f}",
    ]
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"dpo_3b_gpu-{args.arch}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / f"dpo_3b_gpu-{args.arch}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
