"""The on-disk reference cache: scores come back exactly, for the same model only."""

from __future__ import annotations

import torch

from criteriapo.models.refcache import ReferenceCache, model_key
from criteriapo.train.tasks import score_pairs
from tests.train.test_loop import PAD, tiny_model, toy_pairs


def test_a_second_run_reads_every_score_back_without_scoring(tmp_path):
    pairs = toy_pairs(6)
    first = ReferenceCache(tmp_path / "ref.safetensors")
    want = score_pairs(tiny_model(0), pairs, PAD, cache=first)
    first.save()
    again = ReferenceCache(tmp_path / "ref.safetensors")
    got = score_pairs(tiny_model(1), pairs, PAD, cache=again)  # another model: only a cache hit gives want
    assert torch.equal(got.chosen, want.chosen) and torch.equal(got.rejected, want.rejected)
    assert torch.equal(got.chosen_tokens, want.chosen_tokens)
    fresh = score_pairs(tiny_model(1), pairs, PAD)
    assert not torch.equal(fresh.chosen, want.chosen)


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
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    model.save_pretrained(tmp_path / "m")
    assert key != model_key([tmp_path / "m"], torch.float32, torch.device("cpu"))
