"""The built-in multi-criteria dataset maker: its prompts, their wordings, and its records."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from criteriapo.criteria.library import parse_criterion
from criteriapo.criteria.maker import (
    CONFLICTS,
    Drawn,
    MakerOptions,
    decoy_prompts,
    draw_prompts,
    make_criteria_dataset,
    make_record,
)
from criteriapo.criteria.phrasing import CRITERIA, TASKS
from criteriapo.data.loading import load_data
from criteriapo.data.records import MultiCriteriaExample, RowRef
from tests.helpers import write_criteria_data


def test_prompts_have_one_to_three_compatible_criteria():
    drawn = draw_prompts(200, seed=0)
    sizes = Counter(len(d.criteria) for d in drawn)
    assert set(sizes) == {1, 2, 3}
    for d in drawn:
        fams = [c.name.partition(":")[0] for c in d.criteria]
        assert len(set(fams)) == len(fams)
        assert not any({a, b} in CONFLICTS for a in fams for b in fams if a != b)
    assert draw_prompts(200, seed=0) == drawn and draw_prompts(200, seed=1) != drawn


def _wordings(split: int) -> list[str]:
    return [p.split("{")[0] for ps in CRITERIA.values() for p in ps[split]] + [
        t.split("{")[0] for t in TASKS[split]
    ]


def test_held_out_prompts_are_worded_unlike_any_training_prompt():
    drawn = draw_prompts(400, seed=0, held_out=0.25)
    assert Counter(d.split for d in drawn) == {"train": 300, "heldout": 100}
    train_only = [w for w in _wordings(0) if w not in _wordings(1)]
    for d in drawn:
        if d.split == "heldout":
            assert not any(w and w in d.text for w in train_only), d.text
    # training prompts use several wordings of one criterion, not one template
    lowercase = {
        d.text for d in drawn if d.split == "train" and [c.name for c in d.criteria] == ["lowercase"]
    }
    used = {p for p in CRITERIA["lowercase"][0] if any(p in t for t in lowercase)}
    assert len(used) >= 2


def test_every_wording_asks_what_its_checker_tests():
    """Each phrasing names the criterion's number, keyword or phrase, so the checker's verdict is
    the one a reader of the prompt would give."""
    for family, (train, held) in CRITERIA.items():
        for p in train + held:
            if family in ("max_words", "min_words", "max_sentences", "paragraphs", "bullets"):
                assert "{n}" in p, p
            if family in ("include", "avoid"):
                assert "{kw}" in p, p
            if family in ("starts_with", "ends_with"):
                assert "{a}" in p, p


def _drawn(specs: list[str], split: str = "train") -> Drawn:
    cs = tuple(parse_criterion(s) for s in specs)
    return Drawn("rain", cs, split, "Describe rain.", "Describe rain. " + " ".join(c.description for c in cs))


def _sample(text: str, cut_off: bool = False) -> dict:
    return {"text": text, "cut_off": cut_off}


def test_samples_that_separate_need_no_edit_and_a_decoy_shows_unasked_format():
    row = make_record(
        _drawn(["max_words:20", "no_commas"]),
        [_sample("Rain, rain, and more rain falls today."), _sample("Rain falls from clouds and it is wet.")],
        "m",
    )
    assert row["criteria"] == ["max_words:20", "no_commas", "as_asked"]
    sources = [c["model"] for c in row["completions"]]
    assert sources[:2] == ["m", "m"] and len(sources) == 3 and sources[2].startswith("decoy:")
    best, other, decoy = row["completions"]
    assert best["response"] == "Rain falls from clouds and it is wet."  # the best sample comes first
    assert best["ratings"] == {"max_words:20": 1.0, "no_commas": 1.0, "as_asked": 1.0}
    assert other["ratings"] == {"max_words:20": 1.0, "no_commas": 0.0, "as_asked": 1.0}
    # the decoy is the best sample with a format nobody asked for: a minimal pair on as_asked
    assert decoy["ratings"]["as_asked"] == 0.0 and "Rain falls from clouds and it is wet" in decoy["response"]


def test_a_third_of_decoys_loop_and_any_reply_that_loops_is_not_as_asked():
    best = "Rain falls from clouds. It is wet and cold."
    kinds = Counter()
    for k in range(60):
        drawn = Drawn(
            "rain", (parse_criterion("max_words:20"),), "train", "Describe rain.", f"Describe rain. {k}"
        )
        row = make_record(drawn, [_sample(best), _sample("Rain.")], "m")
        decoys = [c for c in row["completions"] if c["model"].startswith("decoy:")]
        assert len(decoys) == 1 and decoys[0]["ratings"]["as_asked"] == 0.0
        kinds[decoys[0]["model"] == "decoy:loop"] += 1
        if decoys[0]["model"] == "decoy:loop":  # the best sample, one sentence said three times
            text = decoys[0]["response"]
            assert text.count("Rain falls from clouds.") == 3 or text.count("It is wet and cold.") == 3
    assert 10 <= kinds[True] <= 30 and kinds[False] >= 30
    looped = "Rain is wet. Rain is wet. Rain is wet."
    row = make_record(_drawn(["max_words:20"]), [_sample(looped), _sample(best)], "m", decoy=False)
    assert {c["response"]: c["ratings"]["as_asked"] for c in row["completions"]} == {best: 1.0, looped: 0.0}


def test_a_criterion_no_sample_passes_gets_one_natural_edit_of_the_best_sample():
    samples = [
        _sample("Rain falls from clouds. It waters the fields. It fills the rivers."),
        _sample("Rain is wet."),
        _sample("Rain falls from clouds", cut_off=True),  # nothing complete to keep
    ]
    row = make_record(_drawn(["lowercase", "max_sentences:2"]), samples, "m")
    by_text = {c["response"]: c for c in row["completions"]}
    edited = [c for c in row["completions"] if c["model"].startswith("edit:")]
    # the best sample (it passes max_sentences) is the one edited, for the criterion none passed
    assert [(c["model"], c["response"]) for c in edited] == [("edit:lowercase", "rain is wet.")]
    assert edited[0]["ratings"] == {"lowercase": 1.0, "max_sentences:2": 1.0, "as_asked": 1.0}
    assert row["completions"][0]["response"] == "Rain is wet."  # first: the rejected one on a tie
    assert by_text["Rain falls from clouds"]["cut_off"] is True  # kept, marked: a rejected one at most
    assert "cut_off" not in by_text["Rain is wet."]


def test_finegrained_pairs_from_a_record_differ_only_where_the_criterion_does():
    from criteriapo.criteria.pairs import build_finegrained
    from criteriapo.data.formats import parse_multi_criteria

    row = make_record(_drawn(["lowercase"]), [_sample("Rain is wet."), _sample("It rains a lot here.")], "m")
    fields = parse_multi_criteria(row)
    ex = MultiCriteriaExample(
        fields["prompt"], fields["completions"], RowRef("t", 1), fields.get("metadata", {})
    )
    pairs = {p.criterion: (p.chosen[0]["content"], p.rejected[0]["content"]) for p in build_finegrained([ex])}
    best = row["completions"][0]["response"]
    assert pairs["lowercase"] == (best.lower(), best)
    decoy = pairs["as_asked"][1]
    assert pairs["as_asked"][0] == best and best.lower() in decoy.lower() and decoy != best


def test_cut_off_sample_is_trimmed_to_its_last_sentence():
    row = make_record(_drawn(["max_words:40"]), [_sample("Rain falls. It is wet and", cut_off=True)], "m")
    assert row["completions"][0]["response"] == "Rain falls."


def test_a_looping_sample_is_never_the_one_edited():
    loop = "Rain is wet wet wet wet wet wet."
    row = make_record(_drawn(["uppercase"]), [_sample(loop), _sample("Rain falls softly.")], "m")
    edited = [c["response"] for c in row["completions"] if c["model"].startswith("edit:")]
    assert edited == ["RAIN FALLS SOFTLY."]


def test_dataset_splits_by_prompt_and_loads(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("CRITERIAPO_CACHE", str(tmp_path / "cache"))
    opts = MakerOptions(prompts=10, samples=2, held_out=0.3, max_new_tokens=8, batch_size=5)
    counts = make_criteria_dataset(tmp_path / "out", str(tiny_llama_dir), opts)
    assert (counts["train"], counts["heldout"]) == (7, 3)
    train = load_data(tmp_path / "out" / "train.jsonl")
    held = load_data(tmp_path / "out" / "heldout.jsonl")
    assert train.kind == held.kind == "multi_criteria" and not train.bad_rows
    prompts = [e.prompt[0]["content"] for e in train.examples + held.examples]
    assert len(set(prompts)) == 10  # no prompt in both splits
    (cache,) = (tmp_path / "cache" / "samples").glob("*.json")
    assert all(len(r) == 2 for r in json.loads(cache.read_text()))  # two samples per prompt
    stamp = cache.stat().st_mtime_ns
    first = (tmp_path / "out" / "train.jsonl").read_text()
    make_criteria_dataset(tmp_path / "out", str(tiny_llama_dir), opts)  # served from the cache
    assert cache.stat().st_mtime_ns == stamp and (tmp_path / "out" / "train.jsonl").read_text() == first


def test_a_prompt_left_with_one_reply_is_left_out_and_counted(tmp_path, tiny_llama_dir, monkeypatch):
    from criteriapo.criteria.maker import _samples_key, draw_prompts

    monkeypatch.setenv("CRITERIAPO_CACHE", str(tmp_path / "cache"))
    opts = MakerOptions(prompts=4, samples=2, held_out=0.25, max_new_tokens=8, decoys=0.0)
    texts = [d.text for d in draw_prompts(opts.prompts, opts.seed, opts.held_out)]
    replies = [[_sample(""), _sample("")]] + [[_sample("Rain falls."), _sample("Rain is wet.")]] * 3
    cached = tmp_path / "cache" / "samples" / f"{_samples_key(tiny_llama_dir, texts, opts)}.json"
    cached.parent.mkdir(parents=True)
    cached.write_text(json.dumps(replies))
    counts = make_criteria_dataset(tmp_path / "out", str(tiny_llama_dir), opts)
    assert counts["left_out"] == 1 and counts["train"] + counts["heldout"] == 3
    rows = load_data([tmp_path / "out" / "train.jsonl", tmp_path / "out" / "heldout.jsonl"])
    assert not rows.bad_rows and texts[0] not in [e.prompt[0]["content"] for e in rows.examples]


def test_decoys_go_to_the_share_of_prompts_asked_for():
    assert not any(decoy_prompts(200, 0, 0.0)) and all(decoy_prompts(200, 0, 1.0))
    assert 60 < sum(decoy_prompts(200, 0, 0.5)) < 140
    assert decoy_prompts(50, 3, 0.5) == decoy_prompts(50, 3, 0.5) != decoy_prompts(50, 4, 0.5)
    samples = [_sample("Rain falls from clouds and it is wet.")]
    row = make_record(_drawn(["max_words:20"]), samples, "m", decoy=False)
    assert [c["model"] for c in row["completions"]] == ["m"]


@pytest.mark.parametrize("recipe", ["vanilla", "mini", "finegrained"])
def test_recipes_build_pairs_from_it(tmp_path, recipe):
    from criteriapo.criteria.pairs import RecipeOptions, build_pairs

    write_criteria_data(tmp_path / "out", prompts=24)
    examples = load_data(tmp_path / "out" / "train.jsonl").examples
    pairs = build_pairs(recipe, examples, RecipeOptions(mini_min_margin=0.5))
    assert pairs
    if recipe == "finegrained":
        assert {p.criterion for p in pairs} <= {c for e in examples for c in e.criteria}


def test_batch_by_batch_sampling_draws_what_one_call_over_all_prompts_draws(
    tmp_path, tiny_llama_dir, monkeypatch
):
    """The maker samples batch by batch (so that processes can share them out); each batch's
    generator is the one a single call over every prompt gives it, so the cached replies are those."""
    from criteriapo.criteria.maker import _sample_cached, draw_prompts
    from criteriapo.generation import Sampling, generate_batch
    from criteriapo.models import load_model, load_tokenizer

    monkeypatch.setenv("CRITERIAPO_CACHE", str(tmp_path / "cache"))
    opts = MakerOptions(prompts=7, samples=2, held_out=0.3, max_new_tokens=8, batch_size=4, seed=3)
    texts = [d.text for d in draw_prompts(opts.prompts, opts.seed, opts.held_out)]
    got = _sample_cached(tiny_llama_dir, texts, opts)
    convs = [[{"role": "user", "content": t}] for t in texts]
    once = generate_batch(
        load_model(tiny_llama_dir),
        load_tokenizer(tiny_llama_dir),
        convs,
        Sampling(8, 1.0, 0.95, seed=3000),
        samples=2,
        batch_size=4,
    )
    assert got == [[{"text": r.text, "cut_off": r.cut_off} for r in once[i : i + 2]] for i in range(0, 14, 2)]
    assert len({r["text"] for rs in got for r in rs}) > 7  # sampled, not the same reply again and again
