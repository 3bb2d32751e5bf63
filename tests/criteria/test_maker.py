"""The built-in multi-criteria dataset maker."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from criteriapo.criteria import parse_criterion
from criteriapo.criteria.maker import (
    CONFLICTS,
    MakerOptions,
    draw_prompts,
    make_criteria_dataset,
    make_record,
)
from criteriapo.data.loading import load_data


def test_prompts_have_one_to_three_compatible_criteria():
    drawn = draw_prompts(200, seed=0)
    sizes = Counter(len(cs) for _, cs in drawn)
    assert set(sizes) == {1, 2, 3}
    for _, cs in drawn:
        fams = [c.name.partition(":")[0] for c in cs]
        assert len(set(fams)) == len(fams)
        assert not any({a, b} in CONFLICTS for a in fams for b in fams if a != b)
    assert draw_prompts(200, seed=0) == drawn and draw_prompts(200, seed=1) != drawn


def test_record_scores_every_reply_on_every_criterion():
    cs = [parse_criterion("max_words:20"), parse_criterion("no_commas")]
    row = make_record(
        "Describe rain.", cs, ["Rain falls from clouds, and it is wet, cold and grey outside today."], "m"
    )
    assert row["criteria"] == ["max_words:20", "no_commas"]
    by_source = {c["model"]: c["ratings"] for c in row["completions"]}
    assert by_source["m"] == {"max_words:20": 1.0, "no_commas": 0.0}
    assert by_source["edit:satisfy-all"] == {"max_words:20": 1.0, "no_commas": 1.0}
    assert by_source["edit:break:max_words:20"] == {"max_words:20": 0.0, "no_commas": 1.0}
    assert by_source["edit:break:no_commas"] == {"max_words:20": 1.0, "no_commas": 0.0}


def test_dataset_splits_by_prompt_and_loads(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("CRITERIAPO_CACHE", str(tmp_path / "cache"))
    opts = MakerOptions(prompts=10, samples=1, held_out=0.3, max_new_tokens=8, batch_size=5)
    counts = make_criteria_dataset(tmp_path / "out", str(tiny_llama_dir), opts)
    assert (counts["train"], counts["heldout"]) == (7, 3)
    train = load_data(tmp_path / "out" / "train.jsonl")
    held = load_data(tmp_path / "out" / "heldout.jsonl")
    assert train.kind == held.kind == "multi_criteria" and not train.bad_rows
    prompts = [e.prompt[0]["content"] for e in train.examples + held.examples]
    assert len(set(prompts)) == 10  # no prompt in both splits
    (cache,) = (tmp_path / "cache" / "samples").glob("*.json")
    stamp = cache.stat().st_mtime_ns
    first = (tmp_path / "out" / "train.jsonl").read_text()
    make_criteria_dataset(tmp_path / "out", str(tiny_llama_dir), opts)  # served from the cache
    assert cache.stat().st_mtime_ns == stamp and (tmp_path / "out" / "train.jsonl").read_text() == first
    rows = [json.loads(x) for x in first.splitlines()]
    assert all(any(c["model"] == str(tiny_llama_dir) for c in r["completions"]) for r in rows)


@pytest.mark.parametrize("recipe", ["vanilla", "mini", "finegrained"])
def test_recipes_build_pairs_from_it(tmp_path, tiny_llama_dir, monkeypatch, recipe):
    from criteriapo.criteria.pairs import RecipeOptions, build_pairs

    monkeypatch.setenv("CRITERIAPO_CACHE", str(tmp_path / "cache"))
    make_criteria_dataset(tmp_path / "out", str(tiny_llama_dir), MakerOptions(prompts=12, samples=0))
    examples = load_data(tmp_path / "out" / "train.jsonl").examples
    pairs = build_pairs(recipe, examples, RecipeOptions(mini_min_margin=0.5))
    assert pairs
    if recipe == "finegrained":
        assert {p.criterion for p in pairs} <= {c for e in examples for c in e.criteria}
