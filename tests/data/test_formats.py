"""Rows of every supported shape parse into the right typed example."""

from __future__ import annotations

import pytest

from criteriapo.data.formats import split_shared_text
from criteriapo.data.loading import load_data
from criteriapo.data.records import PreferenceExample
from tests.helpers import write_jsonl

U = {"role": "user", "content": "What is 2+2?"}
SYS = {"role": "system", "content": "Be brief."}
A4 = {"role": "assistant", "content": "4"}
A5 = {"role": "assistant", "content": "5"}


def load_one(tmp_path, row, **kw):
    loaded = load_data(write_jsonl(tmp_path / "d.jsonl", [row]), **kw)
    assert not loaded.bad_rows
    return loaded.examples[0]


@pytest.mark.parametrize(
    "chosen, rejected, expected",
    [
        ("Q: 2+2? A: 4", "Q: 2+2? A: 5", ("Q: 2+2? A:", " 4", " 5")),
        ("The cat sat", "The car sat", ("The", " cat sat", " car sat")),
        ("Answer: yes", "Answer: yes!", ("Answer:", " yes", " yes!")),
        ("Say hi\nhello", "Say hi\nbye", ("Say hi", "\nhello", "\nbye")),
    ],
)
def test_implicit_prompt_of_strings_cuts_at_a_word_boundary(chosen, rejected, expected):
    assert split_shared_text(chosen, rejected) == expected


def test_standard_explicit(tmp_path):
    ex = load_one(tmp_path, {"prompt": "Q?", "chosen": "yes", "rejected": "no"})
    assert isinstance(ex, PreferenceExample)
    assert (ex.prompt, ex.chosen, ex.rejected, ex.conversational, ex.implicit_prompt) == (
        "Q?",
        "yes",
        "no",
        False,
        False,
    )


def test_standard_implicit(tmp_path):
    ex = load_one(tmp_path, {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"})
    assert (ex.prompt, ex.chosen, ex.rejected, ex.implicit_prompt) == ("Q: 2+2? A:", " 4", " 5", True)


def test_conversational_explicit(tmp_path):
    ex = load_one(tmp_path, {"prompt": [SYS, U], "chosen": [A4], "rejected": [A5]})
    assert (ex.prompt, ex.chosen, ex.rejected, ex.conversational) == ([SYS, U], [A4], [A5], True)


def test_conversational_implicit(tmp_path):
    ex = load_one(tmp_path, {"chosen": [SYS, U, A4], "rejected": [SYS, U, A5]})
    assert (ex.prompt, ex.chosen, ex.rejected, ex.implicit_prompt) == ([SYS, U], [A4], [A5], True)


def test_ultrafeedback_binarized_prompt_string_beside_full_conversations(tmp_path):
    ex = load_one(tmp_path, {"prompt": "What is 2+2?", "chosen": [U, A4], "rejected": [U, A5]})
    assert (ex.prompt, ex.chosen, ex.rejected) == ([U], [A4], [A5])


def test_string_prompt_with_assistant_only_completions_becomes_a_user_message(tmp_path):
    ex = load_one(tmp_path, {"prompt": "What is 2+2?", "chosen": [A4], "rejected": [A5]})
    assert ex.prompt == [U]


def test_multi_turn_implicit_prompt_keeps_earlier_turns(tmp_path):
    u2 = {"role": "user", "content": "And 3+3?"}
    ex = load_one(
        tmp_path,
        {
            "chosen": [U, A4, u2, {"role": "assistant", "content": "6"}],
            "rejected": [U, A4, u2, {"role": "assistant", "content": "7"}],
        },
    )
    assert ex.prompt == [U, A4, u2] and ex.chosen == [{"role": "assistant", "content": "6"}]


def test_criteria_pairs(tmp_path):
    ex = load_one(
        tmp_path, {"prompt": "Q?", "chosen": "a", "rejected": "b", "criterion": "brevity", "weight": 0.5}
    )
    assert (ex.criterion, ex.weight) == ("brevity", 0.5)
    ex = load_one(
        tmp_path,
        {
            "prompt": "Q?",
            "chosen": "a",
            "rejected": "b",
            "criteria_labels": {"brevity": "chosen", "tone": -1, "format": "tie"},
        },
    )
    assert ex.criteria_labels == {"brevity": 1, "tone": -1, "format": 0}


def test_sft_messages_train_from_first_assistant(tmp_path):
    u2 = {"role": "user", "content": "And 3+3?"}
    ex = load_one(tmp_path, {"messages": [SYS, U, A4, u2, A5]})
    assert ex.prompt == [SYS, U] and ex.completion == [A4, u2, A5]


def test_sft_prompt_completion(tmp_path):
    ex = load_one(tmp_path, {"prompt": "Q?", "completion": "A."})
    assert (ex.prompt, ex.completion, ex.conversational) == ("Q?", "A.", False)
    ex = load_one(tmp_path, {"prompt": [U], "completion": "4"})
    assert (ex.prompt, ex.completion) == ([U], [A4])


def test_sft_text(tmp_path):
    ex = load_one(tmp_path, {"text": "Once upon a time."})
    assert (ex.prompt, ex.completion) == ("", "Once upon a time.")


def test_ultrafeedback_record(tmp_path):
    row = {
        "source": "evol",
        "instruction": "Explain DPO.",
        "models": ["m1", "m2"],
        "completions": [
            {
                "model": "m1",
                "response": "DPO is ...",
                "overall_score": 7.5,
                "annotations": {
                    "helpfulness": {"Rating": "4", "Rationale": "ok"},
                    "honesty": {"Rating": "N/A"},
                },
            },
            {
                "model": "m2",
                "response": "No idea.",
                "overall_score": 2,
                "annotations": {
                    "helpfulness": {"Rating": "1", "Rationale": "bad"},
                    "honesty": {"Rating": "5"},
                },
            },
        ],
    }
    ex = load_one(tmp_path, row)
    assert ex.prompt == "Explain DPO." and ex.criteria == ["helpfulness", "honesty"]
    assert [c.ratings for c in ex.completions] == [
        {"helpfulness": 4.0, "honesty": None},
        {"helpfulness": 1.0, "honesty": 5.0},
    ]
    assert [c.overall for c in ex.completions] == [7.5, 2.0] and ex.completions[0].model == "m1"
    assert ex.metadata == {"source": "evol", "models": ["m1", "m2"]}


def test_simple_ratings_with_conversational_prompt(tmp_path):
    ex = load_one(
        tmp_path,
        {
            "prompt": [U],
            "completions": [
                {"response": "4", "ratings": {"correct": 1, "brief": 1}},
                {"response": "5", "ratings": {"correct": 0}},
            ],
        },
    )
    assert ex.conversational and ex.completions[1].ratings == {"correct": 0.0}


def test_format_is_the_majority_of_rows(tmp_path):
    rows = [{"messages": [U, A4]}] + [{"prompt": "Q?", "chosen": "a", "rejected": "b"}] * 3
    loaded = load_data(write_jsonl(tmp_path / "d.jsonl", rows), on_bad_row="skip")
    assert loaded.kind == "preference" and [b.row for b in loaded.bad_rows] == [1]


def test_multi_criteria_file_asked_for_as_pairs_says_what_to_do(tmp_path):
    from criteriapo.errors import DataError

    row = {
        "instruction": "Q?",
        "completions": [{"response": "a", "ratings": {"h": 1}}, {"response": "b", "ratings": {"h": 2}}],
    }
    with pytest.raises(DataError, match="multi-criteria ratings.*recipe"):
        load_data(write_jsonl(tmp_path / "d.jsonl", [row]), kind="preference")
