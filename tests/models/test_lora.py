"""LoRA: only the adapters train; the DPO reference is the policy with its adapters off; export
merges them or keeps an adapter folder that loads by itself; checkpoints hold just the adapters."""

from __future__ import annotations

import pytest
import torch

from criteriapo.config import DPOConfig, LoraConfig, OptimConfig, TrainConfig
from criteriapo.errors import ConfigError
from criteriapo.export import ModelCard, export_model
from criteriapo.models import load_model, load_tokenizer
from criteriapo.models.lora import adapters_off, apply_lora, for_export, trainable_parameters
from criteriapo.models.training import enable_activation_checkpointing
from criteriapo.tracking.loggers import Loggers
from criteriapo.train.checkpoint import Checkpointer
from criteriapo.train.loop import Trainer
from criteriapo.train.precision import resolve_precision
from criteriapo.train.scores import score_pairs
from criteriapo.train.tasks import DPOTask
from tests.train.test_loop import PAD, tiny_model, toy_pairs

LORA = LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def lora_trainer(model, pairs, precompute: bool = False, folder=None):
    ref = score_pairs(model, pairs, PAD) if precompute else None
    task = DPOTask(DPOConfig(), PAD, 64, reference=ref, ref_model=None if precompute else model)
    t = Trainer(
        model,
        task,
        pairs,
        OptimConfig(lr=1e-2, scheduler="constant"),
        TrainConfig(batch_size=8, micro_batch_size=4, epochs=2),
        Loggers([]),
    )
    if folder is not None:
        t.checkpointer = Checkpointer(folder, {}, every=1)
    return t


def test_only_adapters_train_and_unknown_targets_are_named():
    model = apply_lora(tiny_model(), LORA)
    trainable, total = trainable_parameters(model)
    assert 0 < trainable < total / 10
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match=r"lora.target_modules: qkv_proj not found.*q_proj"):
        apply_lora(tiny_model(), LoraConfig(enabled=True, target_modules=["qkv_proj"]))


def test_reference_is_the_policy_with_adapters_off():
    pairs = toy_pairs(16)
    base_scores = score_pairs(tiny_model(), pairs, PAD)
    model = apply_lora(tiny_model(), LORA)
    t = lora_trainer(model, pairs)
    first = t.train_step(list(range(8)))
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # B = 0: policy == reference
    for _ in range(3):
        t.train_step(t.order.next_batch(8))
    with adapters_off(model):
        off = score_pairs(model, pairs, PAD)
    on = score_pairs(model, pairs, PAD)
    torch.testing.assert_close(off.chosen.logps, base_scores.chosen.logps)  # the base never moved
    assert not torch.allclose(on.margins, off.margins)  # the adapters did
    assert float(on.margins.mean()) > float(off.margins.mean())


@pytest.mark.parametrize("keep_adapter", [False, True])
def test_export_merged_or_as_adapter_loads_back_the_same_model(tmp_path, tiny_llama_dir, keep_adapter):
    tok = load_tokenizer(tiny_llama_dir)
    model = apply_lora(load_model(tiny_llama_dir), LORA)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # as if trained
    ids = torch.tensor([[5, 6, 7, 8]])
    want = model(input_ids=ids).logits
    out = export_model(
        for_export(model, keep_adapter), tok, tmp_path / "m", ModelCard("m", "tiny", "DPO", [], {})
    )
    files = {p.name for p in out.iterdir()}
    if keep_adapter:
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
        assert "model.safetensors" not in files
    else:
        assert "model.safetensors" in files and "adapter_config.json" not in files
    got = load_model(out)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_adapter_folder_runs_in_transformers_pipeline(tmp_path, tiny_llama_dir):
    from transformers import pipeline

    tok = load_tokenizer(tiny_llama_dir)
    model = apply_lora(load_model(tiny_llama_dir), LORA)
    out = export_model(model, tok, tmp_path / "adapter", ModelCard("m", "tiny", "DPO", [], {}))
    generator = pipeline("text-generation", model=str(out))
    reply = generator([{"role": "user", "content": "Hi"}], max_new_tokens=3, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"


def test_lora_checkpoint_holds_only_adapters_and_resumes_exactly(tmp_path):
    pairs = toy_pairs(16)
    straight = lora_trainer(apply_lora(tiny_model(), LORA), pairs, folder=tmp_path)
    for _ in range(2):
        straight.train_step(straight.order.next_batch(8))
    straight.save_checkpoint()
    ck = straight.checkpointer.latest()
    assert ck.info["trainable_only"] and all("lora_" in k for k in ck.tensors("model.safetensors"))
    resumed = lora_trainer(apply_lora(tiny_model(), LORA), pairs, folder=tmp_path)
    resumed.checkpointer.restore(resumed, ck)
    for _ in range(2):
        assert (
            straight.train_step(straight.order.next_batch(8))["loss"]
            == resumed.train_step(resumed.order.next_batch(8))["loss"]
        )
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_gradient_checkpointing_gives_the_same_gradients():
    pairs = toy_pairs(8)
    grads = []
    for gc in (False, True):
        model = tiny_model()
        if gc:
            enable_activation_checkpointing(model)
        t = lora_trainer(model, pairs, precompute=True)
        t.model.train()
        t.accumulate_gradients(list(range(8)))
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_mixed_precision_stays_close_to_float32():
    pairs = toy_pairs(8)
    losses = []
    for mp in ("fp32", "bf16-mixed"):
        t = lora_trainer(tiny_model(), pairs, precompute=True)
        t.cfg = TrainConfig(batch_size=8, micro_batch_size=4, precision=mp)
        t.precision = resolve_precision(mp, torch.float32)
        losses.append(t.train_step(list(range(8)))["loss"])
        assert all(p.dtype == torch.float32 for p in t.model.parameters())  # master weights stay fp32
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
