"""Memory each ready config for the CriteriaPO originals needs per GPU, computed (no GPU needed).

Parameter counts come from the real architectures, built on the meta device (no weights). The rest is
arithmetic, stated here so it can be checked:

- weights: with ``train.precision: bf16-mixed`` (what ``auto`` gives the configs' ``dtype: bfloat16``)
  trained weights are fp32 master weights, 4 bytes per parameter, and autocast keeps a bf16 copy of
  each while a step runs (2 more); a frozen LoRA base stays bf16 (2) and its adapters are fp32. With
  ``bf16-true`` (and ``optim.name: adamw_sr``) weights are bf16, 2 bytes;
- gradients: one per trainable parameter, in the trained weights' dtype; when each weight is
  stepped in backward (and its gradient freed at once), two of the output layer's size: its
  gradient is built through backward from the chunks of log-probs, each chunk's added in place to
  it (and a tied embedding's at the end), measured by benchmarks/memory_scaled_cpu.py;
- AdamW: two states per trainable parameter, in the trained weights' dtype;
- FSDP2 over G GPUs: weights, gradients and optimizer states divided by G; one decoder block is
  gathered whole at a time (counted once);
- activations: bf16 (float32 with ``precision: fp32``: twice the bytes), per token per decoder
  block ~34 x hidden bytes without gradient checkpointing
  (Korthikanti et al. 2022, attention scores not kept, as with SDPA/flash), and 2 x hidden bytes
  (the block's input) with it, plus one block recomputed; tokens per micro-batch = micro_batch x
  sequences per example (DPO: chosen + rejected) x max_length;
- log-probs: our chunked output layer keeps one (256, vocab) chunk of fp32 logits and its gradient;
- the DPO reference costs nothing when precomputed (the default); a frozen reference held in memory
  would add its weights (shown separately).

Run: .venv/bin/python benchmarks/memory_3b.py   (prints a markdown table; about 10 s)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

GIB = 1024**3
ARCHS = {
    "Llama 3.2 3B": LlamaConfig(
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
    ),
    "Qwen2.5 3B": Qwen2Config(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Setup:
    name: str
    stage: str  # sft | dpo
    gpus: int
    lora: bool
    micro_batch: int
    max_length: int
    checkpointing: bool
    precision: str = "bf16-mixed"  # or bf16-true
    in_backward: bool = False  # each weight stepped when its gradient is done: no gradients held


SETUPS = [
    Setup("SFT full, 1 GPU", "sft", 1, False, 4, 2048, True),
    Setup("DPO full, 1 GPU", "dpo", 1, False, 2, 2048, True),
    Setup("DPO full, 1 GPU, no checkpointing", "dpo", 1, False, 2, 2048, False),
    Setup("DPO full, 1 GPU, bf16-true + adamw_sr", "dpo", 1, False, 2, 2048, True, "bf16-true"),
    # configs/llama3.2-3b-24gb.yaml
    Setup(
        "SFT full, 1 GPU, bf16-true + adamw_sr in backward", "sft", 1, False, 4, 2048, True, "bf16-true", True
    ),
    Setup(
        "DPO full, 1 GPU, bf16-true + adamw_sr in backward", "dpo", 1, False, 2, 2048, True, "bf16-true", True
    ),
    Setup("SFT LoRA r16, 1 GPU", "sft", 1, True, 4, 2048, True),
    Setup("DPO LoRA r16, 1 GPU", "dpo", 1, True, 2, 2048, True),
    Setup("SFT full, 8 GPUs (FSDP2)", "sft", 8, False, 8, 2048, True),
    Setup("DPO full, 8 GPUs (FSDP2)", "dpo", 8, False, 4, 2048, True),
]


def counts(config) -> tuple[int, int, int, int]:
    """(parameters, LoRA r16 parameters, parameters of one decoder block, vocabulary)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    lora = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS:
            lora += 16 * (m.in_features + m.out_features)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    return total, lora, block, config.vocab_size


def gib(config, s: Setup) -> dict[str, float]:
    n, n_lora, n_block, vocab = counts(config)
    h, layers = config.hidden_size, config.num_hidden_layers
    shard = s.gpus
    master = 2 if s.precision == "bf16-true" else 4  # bytes per trained weight (fp32 master weights)
    act = 4 if s.precision == "fp32" else 2  # bytes per activation value
    if s.lora:  # a frozen bf16 base, fp32 adapters (peft), their gradients and AdamW states
        weights = 2 * n + 4 * n_lora
        grads, adam = 4 * n_lora, 8 * n_lora
    else:
        copies = 2 * n / shard if s.precision == "bf16-mixed" else 0  # autocast's bf16 copy of each weight
        weights = master * n / shard + copies + (2 * n_block if shard > 1 else 0)
        # stepped in backward, only the output layer's gradient (vocab x hidden) is held through
        # backward, and a second one while a chunk's (or, tied, the embedding's) is added to it
        head_grads = 2 * vocab * h * master / shard
        grads, adam = (head_grads if s.in_backward else master * n / shard), 2 * master * n / shard
    tokens = s.micro_batch * (2 if s.stage == "dpo" else 1) * s.max_length
    per_token_block = (1 if s.checkpointing else 17) * act * h
    acts = tokens * layers * per_token_block + (17 * act * h * tokens if s.checkpointing else 0)
    logps = 2 * 256 * vocab * 4  # CHUNK_TOKENS (criteriapo.losses.logprobs)
    parts = {
        "weights": weights,
        "grads": grads,
        "adam": adam,
        "activations": acts,
        "log-probs": logps,
    }
    out = {k: v / GIB for k, v in parts.items()}
    out["total"] = sum(out.values())
    out["frozen ref (if not precomputed)"] = (0 if s.lora else 2 * n / shard) / GIB
    return out


def main() -> None:
    for arch, config in ARCHS.items():
        n, n_lora, _, _ = counts(config)
        print(
            f"\n### {arch}: {n / 1e9:.2f} B parameters, LoRA r16 on all linear layers {n_lora / 1e6:.1f} M\n"
        )
        head = ["setup", "micro-batch x length", "weights", "grads", "AdamW", "activations", "log-probs"]
        print("| " + " | ".join([*head, "total GiB/GPU", "+ frozen reference"]) + " |")
        print("|" + "---|" * (len(head) + 2))
        for s in SETUPS:
            g = gib(config, s)
            cells = [
                s.name,
                f"{s.micro_batch} x {s.max_length}" + (" x 2" if s.stage == "dpo" else ""),
                *(f"{g[k]:.1f}" for k in ("weights", "grads", "adam", "activations", "log-probs")),
                f"**{g['total']:.1f}**",
                f"{g['frozen ref (if not precomputed)']:.1f}",
            ]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
