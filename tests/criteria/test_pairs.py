"""The pair builders on a small hand-made set: counts, tags, weights."""

from __future__ import annotations

import pytest

from criteriapo.criteria.pairs import build_finegrained, build_mini, build_pairs, build_vanilla, overall
from criteriapo.data.records import MultiCriteriaExample, RatedCompletion, RowRef


def ex(row, prompt, *completions):
    return MultiCriteriaExample(
        prompt, [RatedCompletion(r, dict(s)) for r, s in completions], RowRef("hand", row)
    )


# row 1: B best overall (mean 4.5), C worst (1.5); criteria agree (B >= C on both)
# row 2: all equal overall (a tie) -> no vanilla pair; but they differ per criterion
# row 3: X best overall but worse than Y on 'brevity' -> criteria disagree: not in mini
# row 4: one response rated -> nothing
DATA = [
    ex(
        1,
        "Q1?",
        ("A", {"help": 3, "brevity": 3}),
        ("B", {"help": 5, "brevity": 4}),
        ("C", {"help": 1, "brevity": 2}),
    ),
    ex(2, "Q2?", ("D", {"help": 5, "brevity": 1}), ("E", {"help": 1, "brevity": 5})),
    ex(
        3,
        [{"role": "user", "content": "Q3?"}],
        ("X", {"help": 5, "brevity": 1}),
        ("Y", {"help": 1, "brevity": 2}),
    ),
    ex(4, "Q4?", ("F", {"help": 4}), ("G", {"help": None})),
]


def test_overall_prefers_the_given_score():
    assert overall(RatedCompletion("a", {"x": 1, "y": None, "z": 4})) == 2.5
    assert overall(RatedCompletion("a", {"x": 1}, overall=9.0)) == 9.0
    assert overall(RatedCompletion("a", {"x": None})) is None


def test_vanilla_best_against_worst_ties_dropped():
    pairs = build_vanilla(DATA)
    assert [(p.source.row, p.chosen, p.rejected) for p in pairs] == [
        (1, "B", "C"),
        (3, [{"role": "assistant", "content": "X"}], [{"role": "assistant", "content": "Y"}]),
    ]
    assert pairs[0].criteria_labels == {"help": 1, "brevity": 1}
    assert pairs[1].criteria_labels == {"help": 1, "brevity": -1}
    assert all(p.criterion is None and p.weight == 1.0 for p in pairs)


def test_mini_keeps_agreeing_pairs_with_large_margins():
    assert [p.source.row for p in build_mini(DATA, size=None, min_margin=1.0)] == [1]
    assert build_mini(DATA, size=None, min_margin=3.5) == []  # row 1's margin is 4.5 - 1.5 = 3
    many = [ex(i, f"Q{i}?", ("good", {"h": 5}), ("bad", {"h": 5 - i})) for i in range(1, 5)]
    assert [p.source.row for p in build_mini(many, size=2, min_margin=1.0)] == [4, 3]  # largest margins first


def test_finegrained_one_pair_per_criterion_that_differs():
    pairs = build_finegrained(DATA, weights={"brevity": 0.5})
    got = [
        (
            p.source.row,
            p.criterion,
            p.chosen if isinstance(p.chosen, str) else p.chosen[0]["content"],
            p.rejected if isinstance(p.rejected, str) else p.rejected[0]["content"],
            p.weight,
        )
        for p in pairs
    ]
    assert got == [
        (1, "help", "B", "C", 1.0),
        (1, "brevity", "B", "C", 0.5),
        (2, "help", "D", "E", 1.0),
        (2, "brevity", "E", "D", 0.5),
        (3, "help", "X", "Y", 1.0),
        (3, "brevity", "Y", "X", 0.5),
    ]  # row 4: only one response rated on help


def test_finegrained_conditioning_names_the_criterion_in_the_prompt():
    pairs = build_finegrained(
        DATA[:1] + DATA[2:3], condition_on_criterion=True, descriptions={"help": "Be as helpful as you can."}
    )
    assert pairs[0].prompt == "Q1?\n\nBe as helpful as you can."
    assert pairs[1].prompt == "Q1?\n\nAbove all, be good on brevity."
    assert pairs[2].prompt == [{"role": "user", "content": "Q3?\n\nBe as helpful as you can."}]
    assert DATA[2].prompt == [{"role": "user", "content": "Q3?"}]  # the source is not modified


def test_verifiable_criteria_are_described_by_the_library():
    data = [ex(1, "Q?", ("a b", {"max_words:3": 1}), ("a b c d", {"max_words:3": 0}))]
    (p,) = build_finegrained(data, condition_on_criterion=True)
    assert p.prompt == "Q?\n\nAnswer in at most 3 words."


def test_unknown_recipe():
    from criteriapo.criteria.pairs import RecipeOptions
    from criteriapo.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown recipe 'best'; choose one of vanilla, mini, finegrained"):
        build_pairs("best", DATA, RecipeOptions())


def test_a_reply_that_loops_or_is_empty_is_never_chosen():
    looping = "Owls hunt at night. Owls hunt at night. Owls hunt at night."
    data = [
        ex(1, "Q?", (looping, {"help": 5}), ("Fine.", {"help": 3}), ("Meh.", {"help": 1})),
        ex(2, "Q?", ("", {"help": 5}), ("Meh.", {"help": 1})),
        ex(3, "Q?", (looping, {"help": 5}), ("Meh.", {"help": 1})),
    ]
    pairs = build_vanilla(data)
    assert [(p.chosen, p.rejected) for p in pairs] == [("Fine.", "Meh.")]  # the next best is chosen
    fine = build_finegrained(data)
    assert [(p.chosen, p.rejected) for p in fine] == [("Fine.", "Meh.")]
    # a looping reply may still be the rejected one
    assert build_vanilla([ex(4, "Q?", ("Good.", {"help": 5}), (looping, {"help": 1}))])[0].rejected == looping


def test_a_reply_cut_off_by_the_token_limit_is_never_chosen():
    cut = RatedCompletion("Owls hunt at night and they", {"help": 5.0}, cut_off=True)
    rows = [
        MultiCriteriaExample("Q?", [cut, RatedCompletion("Fine.", {"help": 3.0})], RowRef("t", 1)),
        MultiCriteriaExample(
            "Q?",
            [
                RatedCompletion("Fine.", {"help": 5.0}),
                RatedCompletion(cut.response, {"help": 1.0}, cut_off=True),
            ],
            RowRef("t", 2),
        ),
    ]  # row 1: the best is cut off and the next best is the worst, so no pair
    assert [(p.chosen, p.rejected) for p in build_vanilla(rows)] == [("Fine.", cut.response)]
