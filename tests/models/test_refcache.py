"""The on-disk reference cache: scores come back exactly, for the same model only."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

from criteriapo.models.refcache import ReferenceCache, file_digest, model_key
from criteriapo.train.scores import score_pairs
from tests.train.test_loop import PAD, tiny_model, toy_pairs


def test_a_second_run_reads_every_score_back_without_scoring(tmp_path):
    pairs = toy_pairs(6)
    first = ReferenceCache(tmp_path / "ref.safetensors")
    want = score_pairs(tiny_model(0), pairs, PAD, cache=first)
    first.save()
    again = ReferenceCache(tmp_path / "ref.safetensors")
    got = score_pairs(tiny_model(1), pairs, PAD, cache=again)  # another model: only a cache hit gives want
    assert torch.equal(got.chosen.logps, want.chosen.logps) and torch.equal(
        got.rejected.logps, want.rejected.logps
    )
    assert torch.equal(got.chosen.tokens, want.chosen.tokens)
    fresh = score_pairs(tiny_model(1), pairs, PAD)
    assert not torch.equal(fresh.chosen.logps, want.chosen.logps)


def test_new_sequences_are_added_to_the_file(tmp_path):
    pairs = toy_pairs(6)
    a = ReferenceCache(tmp_path / "ref.safetensors")
    score_pairs(tiny_model(0), pairs[:3], PAD, cache=a)
    a.save()
    b = ReferenceCache(tmp_path / "ref.safetensors")
    score_pairs(tiny_model(0), pairs, PAD, cache=b)
    b.save()
    assert len(ReferenceCache(tmp_path / "ref.safetensors")._saved) == 12  # 6 pairs x 2 sequences


def test_the_key_follows_the_weights_dtype_and_device(tmp_path):
    model = tiny_model(0)
    model.save_pretrained(tmp_path / "m")
    key = model_key([tmp_path / "m"], torch.float32, torch.device("cpu"))
    assert key == model_key([tmp_path / "m"], torch.float32, torch.device("cpu"))
    assert key != model_key([tmp_path / "m"], torch.bfloat16, torch.device("cpu"))
    assert key != model_key([tmp_path / "m"], torch.float32, torch.device("cpu"), autocast=torch.bfloat16)
    assert key != model_key([tmp_path / "m"], torch.float32, torch.device("cpu"), attention="eager")
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    model.save_pretrained(tmp_path / "m")
    assert key != model_key([tmp_path / "m"], torch.float32, torch.device("cpu"))


def test_a_change_to_one_middle_tensor_or_to_the_config_changes_the_key(tmp_path):
    """safetensors sorts tensors by name: an MLP weight of a middle layer is far from both ends of
    the file, as every tensor a merged LoRA on gate/up/down_proj changes is."""
    model = tiny_model(0, hidden=256)  # 5 MB: the changed tensor is away from both ends
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    f = folder / "model.safetensors"
    (n,) = struct.unpack("<Q", f.read_bytes()[:8])
    start, end = json.loads(f.read_bytes()[8 : 8 + n])["model.layers.0.mlp.up_proj.weight"]["data_offsets"]
    assert 1 << 20 < 8 + n + start and 8 + n + end < f.stat().st_size - (1 << 20)
    key = model_key([folder], torch.float32, torch.device("cpu"))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 3] += 1e-3
    model.save_pretrained(folder)
    changed = model_key([folder], torch.float32, torch.device("cpu"))
    assert changed != key
    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = 5000.0
    (folder / "config.json").write_text(json.dumps(config))
    assert model_key([folder], torch.float32, torch.device("cpu")) != changed


def test_digests_are_recorded_and_follow_size_and_time(tmp_path, monkeypatch):
    monkeypatch.setenv("CRITERIAPO_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 1000)
    first = file_digest(f)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    assert len(list((tmp_path / "cache" / "digests").iterdir())) == 1  # recorded for the next run
    f.write_bytes(b"b" * 1000)  # same size, newer modification time: hashed again
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert file_digest(f) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_an_exported_folder_is_hashed_at_export(tmp_path, monkeypatch, smollm2_tokenizer):
    from criteriapo.export import ModelCard, export_model

    monkeypatch.setenv("CRITERIAPO_CACHE", str(tmp_path / "cache"))
    card = ModelCard(name="m", base_model="tiny", method="DPO", datasets=[], hyperparameters={})
    out = export_model(tiny_model(0), smollm2_tokenizer, tmp_path / "m", card)
    records = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "digests").iterdir()]
    assert {Path(r["path"]).name for r in records} == {"model.safetensors", "config.json"}
    assert all(Path(r["path"]).parent == out.resolve() for r in records)


def test_the_card_names_the_hub_model_a_run_started_from(tmp_path):
    """The Hub's base_model field takes a Hub id: an embedded model's, a Hub id as given, or the one a
    CriteriaPO folder's own card names (an SFT model's card, for the DPO run from it)."""
    from criteriapo.export import ModelCard, hub_id

    assert hub_id("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("Qwen/Qwen2.5-3B-Instruct") == "Qwen/Qwen2.5-3B-Instruct"
    sft = tmp_path / "sft"
    sft.mkdir()
    assert hub_id(str(sft)) is None  # a local folder with no card: no Hub id to claim
    card = ModelCard(name="s", base_model="smollm2", method="SFT", datasets=[], hyperparameters={})
    (sft / "README.md").write_text(card.render(sft))
    assert hub_id(str(sft)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    dpo = ModelCard(name="d", base_model=str(sft), method="DPO", datasets=[], hyperparameters={})
    text = dpo.render(tmp_path / "dpo")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in text and f"Base model: `{sft}`" in text
