"""Tiny random models of the architectures people preference-tune, built in the test (nothing is
downloaded). Each keeps what makes its family different: logit scaling (Granite, Cohere, Falcon-H1),
soft-capping (Gemma 2), sliding windows (Mistral, Gemma 2/3), mixtures of experts (Qwen2-MoE),
hybrid SSM layers (Falcon-H1), output-layer bias (Phi-2), learned positions and dropout (GPT-2, OPT)."""

from __future__ import annotations

import torch

VOCAB = 128
LLAMA_LIKE = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

ZOO: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 4},
    "qwen2": {},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
    },
    "qwen3": {"head_dim": 8},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "sliding_window": 4, "final_logit_softcapping": 5.0},
    "gemma3_text": {"head_dim": 8, "sliding_window": 4},
    "gemma3": {},  # the composite Gemma3ForConditionalGeneration, built below
    "phi3": {},
    "phi": {"resid_pdrop": 0.1, "embd_pdrop": 0.1},  # Phi-2: an output layer with a bias, and dropout
    "granite": {"logits_scaling": 8.0},
    "cohere": {"logit_scale": 0.25},
    "olmo2": {},
    "smollm3": {},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256},  # dropout 0.1 by default
    "opt": {"ffn_dim": 64, "word_embed_proj_dim": 32, "dropout": 0.1},
    "falcon_h1": {
        "lm_head_multiplier": 0.3,
        "mamba_d_ssm": 32,
        "mamba_n_heads": 4,
        "mamba_d_head": 8,
        "mamba_d_state": 8,
        "mamba_n_groups": 1,
        "mamba_chunk_size": 8,
    },
}


def zoo_config(arch: str, **extra):
    from transformers import AutoConfig, Gemma3Config

    if arch == "gemma3":
        text = {**LLAMA_LIKE, "head_dim": 8, "sliding_window": 4, **extra}
        vision = {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        }
        return Gemma3Config(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=4,
            boi_token_index=VOCAB - 3,
            eoi_token_index=VOCAB - 2,
            image_token_index=VOCAB - 1,
        )
    return AutoConfig.for_model(arch, **{**LLAMA_LIKE, **ZOO[arch], **extra})


def zoo_model(arch: str, seed: int = 0, **extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(zoo_config(arch, **extra))
