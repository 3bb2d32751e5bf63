"""Every reason a row can be refused: the error names the file, the row and the field."""

from __future__ import annotations

import json
import math

import pytest

from criteriapo.data.loading import load_data
from criteriapo.data.validation import BadRowsError
from criteriapo.errors import ConfigError
from tests.helpers import write_jsonl

U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello!"}
B = {"role": "assistant", "content": "Bye."}
GOOD = {
    "preference": {"prompt": "Q?", "chosen": "yes", "rejected": "no"},
    "sft": {"messages": [U, A]},
    "multi_criteria": {
        "instruction": "Q?",
        "completions": [
            {"response": "a", "ratings": {"helpfulness": 5}},
            {"response": "b", "ratings": {"helpfulness": 1}},
        ],
    },
}
MC = GOOD["multi_criteria"]["completions"]

CASES = [
    # (kind, bad row, field named, words in the reason)
    ("preference", {"prompt": "Q?", "rejected": "no"}, "chosen", "missing"),
    ("preference", {"prompt": "Q?", "chosen": None, "rejected": "no"}, "chosen", "missing"),
    ("preference", {"prompt": "Q?", "chosen": 7, "rejected": 8}, "chosen", "expected a string, got int"),
    ("preference", {"prompt": "Q?", "chosen": "  ", "rejected": "no"}, "chosen", "empty"),
    ("preference", {"prompt": 3, "chosen": "yes", "rejected": "no"}, "prompt", "expected a string, got int"),
    ("preference", {"prompt": "Q?", "chosen": "same", "rejected": "same"}, "rejected", "identical to chosen"),
    (
        "preference",
        {"prompt": "Q?", "chosen": [A], "rejected": "no"},
        "rejected",
        "chosen is a message list but rejected is a str",
    ),
    ("preference", {"prompt": [U], "chosen": "yes", "rejected": "no"}, "prompt", "prompt is a message list"),
    ("preference", {"chosen": "apple pie", "rejected": "banana split"}, "chosen", "share no beginning"),
    ("preference", {"chosen": "Answer: yes", "rejected": "Answer:"}, "rejected", "empty"),
    ("preference", {"prompt": [U], "chosen": [], "rejected": [B]}, "chosen", "empty list of messages"),
    (
        "preference",
        {"prompt": [U], "chosen": [A], "rejected": ["text"]},
        "rejected[0]",
        "expected a message object with role and content, got str",
    ),
    (
        "preference",
        {"prompt": [U], "chosen": [A], "rejected": [{"role": "robot", "content": "x"}]},
        "rejected[0].role",
        "unknown role 'robot'",
    ),
    (
        "preference",
        {"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": ["x"]}]},
        "rejected[0].content",
        "expected a string, got list",
    ),
    (
        "preference",
        {"prompt": [U], "chosen": [A], "rejected": [{"role": "user", "content": "x"}]},
        "rejected[0].role",
        "a completion must be assistant messages, got 'user'",
    ),
    (
        "preference",
        {"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": " "}]},
        "rejected",
        "empty completion",
    ),
    (
        "preference",
        {"prompt": [U, A], "chosen": [B], "rejected": [A]},
        "prompt[1].role",
        "a prompt must end with a user (or tool) message, got 'assistant'",
    ),
    (
        "preference",
        {"chosen": [U, A], "rejected": [{"role": "user", "content": "Yo"}, B]},
        "chosen",
        "share no leading messages",
    ),
    (
        "preference",
        {"chosen": [U, A], "rejected": [U, A, U]},
        "chosen",
        "has no messages after the part it shares",
    ),
    (
        "preference",
        {"prompt": "Q?", "chosen": "y", "rejected": "n", "weight": -1},
        "weight",
        "expected a number >= 0",
    ),
    (
        "preference",
        {"prompt": "Q?", "chosen": "y", "rejected": "n", "weight": "heavy"},
        "weight",
        "expected a number",
    ),
    ("preference", {"prompt": "Q?", "chosen": "y", "rejected": "n", "criterion": ""}, "criterion", "empty"),
    (
        "preference",
        {"prompt": "Q?", "chosen": "y", "rejected": "n", "criteria_labels": []},
        "criteria_labels",
        "expected a non-empty object",
    ),
    (
        "preference",
        {"prompt": "Q?", "chosen": "y", "rejected": "n", "criteria_labels": {"brevity": "better"}},
        "criteria_labels.brevity",
        "expected 'chosen', 'rejected', 'tie'",
    ),
    (
        "preference",
        {"messages": [U, A]},
        None,
        "looks like a sft row, but this dataset holds preference rows",
    ),
    ("preference", {"question": "Q?", "answer": "A"}, None, "no recognised fields (found question, answer)"),
    ("sft", {"messages": [U]}, "messages", "no assistant message to learn from"),
    ("sft", {"messages": [A]}, "messages", "no user message before the first assistant message"),
    (
        "sft",
        {"messages": [U, {"role": "assistant", "content": ""}]},
        "messages",
        "every assistant message is empty",
    ),
    ("sft", {"messages": "Hi"}, "messages", "expected a list of {role, content} messages, got str"),
    ("sft", {"prompt": "Q?", "completion": ""}, "completion", "empty"),
    ("sft", {"completion": "A"}, "prompt", "missing"),
    ("sft", {"prompt": [A], "completion": "x"}, "prompt[0].role", "must end with a user"),
    ("sft", {"text": 12}, "text", "expected a string, got int"),
    (
        "multi_criteria",
        {"instruction": "Q?", "completions": "a"},
        "completions",
        "expected a list of rated responses",
    ),
    (
        "multi_criteria",
        {"instruction": "Q?", "completions": MC[:1]},
        "completions",
        "needs at least two responses",
    ),
    ("multi_criteria", {"instruction": "", "completions": MC}, "instruction", "empty"),
    (
        "multi_criteria",
        {"instruction": "Q?", "completions": [MC[0], 5]},
        "completions[1]",
        "expected an object with response and ratings, got int",
    ),
    (
        "multi_criteria",
        {"instruction": "Q?", "completions": [MC[0], {"ratings": {"h": 1}}]},
        "completions[1].response",
        "expected a string, got null",
    ),
    (
        "multi_criteria",
        {"instruction": "Q?", "completions": [MC[0], {"response": "b", "ratings": [1]}]},
        "completions[1].ratings",
        "expected an object {criterion: score}, got list",
    ),
    (
        "multi_criteria",
        {"instruction": "Q?", "completions": [MC[0], {"response": "b", "ratings": {"h": "high"}}]},
        "completions[1].ratings.h",
        "expected a number, got 'high'",
    ),
    (
        "multi_criteria",
        {"instruction": "Q?", "completions": [MC[0], {"response": "b", "ratings": {"h": True}}]},
        "completions[1].ratings.h",
        "expected a number, got True",
    ),
    (
        "multi_criteria",
        {"instruction": "Q?", "completions": [MC[0], {"response": "b", "ratings": {"h": [1]}}]},
        "completions[1].ratings.h",
        "expected a number, got list",
    ),
    (
        "multi_criteria",
        {"instruction": "Q?", "completions": [MC[0], {"response": "b", "ratings": {"h": math.inf}}]},
        "completions[1].ratings.h",
        "expected a finite number",
    ),
    (
        "multi_criteria",
        {"instruction": "Q?", "completions": [MC[0], {"response": "b", "annotations": {"h": {"R": 1}}}]},
        "completions[1].annotations.h",
        "rating object has no Rating/score field",
    ),
    (
        "multi_criteria",
        {"instruction": "Q?", "completions": [MC[0], {"response": "b", "ratings": {"h": "N/A"}}]},
        "completions[1].ratings",
        "no rating on any criterion and no overall score",
    ),
]


@pytest.mark.parametrize("kind, row, field, reason", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_row_names_file_row_and_field(tmp_path, kind, row, field, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD[kind], GOOD[kind], row])
    with pytest.raises(BadRowsError) as e:
        load_data(path, kind=kind)
    (bad,) = e.value.bad_rows
    assert (bad.file, bad.row, bad.field) == (str(path), 3, field)
    assert reason in bad.reason
    where = f"{path}, row 3" + (f", field '{field}'" if field else "")
    assert f"{where}: {bad.reason}" in str(e.value)


@pytest.mark.parametrize(
    "line, reason",
    [
        (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', "not valid UTF-8 (byte 16 of the line)"),
        (b'{"prompt": "Q?", "chosen": ', "not valid JSON (Expecting value, column 27)"),
        (b"[1, 2]", "expected an object with named fields, got list"),
        (b"null", "expected an object with named fields, got null"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply to read"),
    ],
)
def test_unreadable_jsonl_line_is_a_bad_row(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD["preference"], line])
    with pytest.raises(BadRowsError) as e:
        load_data(path)
    assert f"{path}, row 2: {reason}" in str(e.value)


@pytest.mark.parametrize(
    "text, field, reason",
    [
        ("prompt,chosen,rejected\nQ?,a,b,extra\n", None, "more cells than the 3 header fields"),
        ("prompt,chosen,rejected\nQ?,a\n", "rejected", "row has fewer cells than the header"),
    ],
)
def test_ragged_csv_rows(tmp_path, text, field, reason):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\nQ?,yes,no\n" + text.split("\n", 1)[1])
    with pytest.raises(BadRowsError) as e:
        load_data(path)
    (bad,) = e.value.bad_rows
    assert (bad.row, bad.field) == (2, field) and reason in bad.reason


def test_csv_invalid_utf8_cell(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,chosen,rejected\nQ?,yes,no\nQ?,caf\xe9,no\n")
    with pytest.raises(BadRowsError, match=r"row 2, field 'chosen': not valid UTF-8"):
        load_data(path)


def test_skip_keeps_every_good_row_and_reports_the_rest(tmp_path):
    rows = [
        GOOD["preference"],
        {"prompt": "Q?", "chosen": "x", "rejected": "x"},
        b"{oops",
        {"prompt": "R?", "chosen": "a", "rejected": "b"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = tmp_path / "run" / "bad_rows.jsonl"
    loaded = load_data(path, on_bad_row="skip", report_path=report)
    assert [e.source.row for e in loaded.examples] == [1, 4]
    assert [(b.row, b.field) for b in loaded.bad_rows] == [(2, "rejected"), (3, None)]
    assert loaded.rows_read == len(loaded.examples) + len(loaded.bad_rows)
    lines = report.read_text().splitlines()
    assert len(lines) == 2 and '"row": 2' in lines[0] and '"field": "rejected"' in lines[0]


def test_error_lists_every_bad_row(tmp_path):
    labels = [
        {"prompt": "Q?", "chosen": "a", "rejected": "b", "criteria_labels": {f"c{i}": "x"}} for i in range(25)
    ]
    rows = [GOOD["preference"], *labels]  # 25 rows, each failing in a field of its own
    with pytest.raises(BadRowsError) as e:
        load_data(write_jsonl(tmp_path / "d.jsonl", rows))
    assert len(e.value.bad_rows) == 25
    assert "25 of 26 rows cannot be used" in str(e.value) and "and 5 more" in str(e.value)


def test_rows_failing_the_same_way_are_said_once(tmp_path):
    """A whole file of the wrong kind is one line with the count, not one line per row."""
    path = write_jsonl(
        tmp_path / "d.jsonl", [GOOD["preference"]] + [{"prompt": "Q?", "chosen": "s", "rejected": "s"}] * 16
    )
    with pytest.raises(BadRowsError) as e:
        load_data(path)
    lines = str(e.value).splitlines()
    assert lines[1].startswith(
        f"  {path}, 16 rows (2, 3, 4, 5, 6, ...), field 'rejected': identical to chosen"
    )
    assert len(lines) == 3


def test_skip_with_no_good_row_left_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q?", "chosen": "s", "rejected": "s"}])
    with pytest.raises(BadRowsError, match="1 of 1 rows"):
        load_data(path, on_bad_row="skip")


def test_unknown_policy(tmp_path):
    with pytest.raises(ConfigError, match="on_bad_row must be one of error, skip, got 'drop'"):
        load_data(write_jsonl(tmp_path / "d.jsonl", [GOOD["preference"]]), on_bad_row="drop")


def test_byte_order_marks_are_ignored(tmp_path):
    row = {"prompt": "What is 2+2?", "chosen": "The answer is 4", "rejected": "The answer is 5"}
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(
        b"\xef\xbb\xbfprompt,chosen,rejected\nWhat is 2+2?,The answer is 4,The answer is 5\n"
    )
    jsonl_path = write_jsonl(tmp_path / "d.jsonl", [b"\xef\xbb\xbf" + json.dumps(row).encode()])
    json_path = tmp_path / "d.json"
    json_path.write_bytes(b"\xef\xbb\xbf" + json.dumps([row]).encode())
    for path in (csv_path, jsonl_path, json_path):
        (ex,) = load_data(path).examples
        assert (ex.prompt, ex.chosen) == ("What is 2+2?", "The answer is 4"), path


@pytest.mark.parametrize(
    "line, field, reason",
    [
        (
            b'{"prompt": "Q?", "chosen": "a", "rejected": "b", "weight": 1' + b"0" * 5000 + b"}",
            None,
            "not readable JSON",
        ),
        (
            b'{"prompt": "Q?", "chosen": "a", "rejected": "b", "weight": 1' + b"0" * 400 + b"}",
            "weight",
            "number too large",
        ),
        (b'{"prompt": "Q?", "chosen": "a\\ud800", "rejected": "b"}', "chosen", "unpaired surrogate"),
        (
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": "@"}],
                    "chosen": [{"role": "assistant", "content": "a"}],
                    "rejected": [{"role": "assistant", "content": "b"}],
                }
            )
            .replace("@", "\\udfff")
            .encode(),
            "prompt[0].content",
            "unpaired surrogate",
        ),
    ],
)
def test_hostile_values_are_bad_rows(tmp_path, line, field, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD["preference"], line])
    loaded = load_data(path, on_bad_row="skip", report_path=tmp_path / "report.jsonl")
    (bad,) = loaded.bad_rows
    assert (bad.row, bad.field) == (2, field) and reason in bad.reason
    assert len(loaded.examples) == 1 and (tmp_path / "report.jsonl").read_text().count("\n") == 1


def _conv(prompt: list[dict]) -> dict:
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Yes."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }


USER = {"role": "user", "content": "Is it so?"}


@pytest.mark.parametrize(
    "row, field, reason",
    [
        ({"prompt": "Q?", "chosen": "a\u0000b", "rejected": "b"}, "chosen", "NUL character (at character 1)"),
        (_conv([USER, USER]), "prompt[1].role", "two user messages in a row (prompt[0] and [1])"),
        (
            _conv([USER, {"role": "system", "content": "Be terse."}, USER]),
            "prompt[1].role",
            "a system message must come first",
        ),
        (
            {
                "messages": [
                    USER,
                    {"role": "assistant", "content": "Yes."},
                    {"role": "system", "content": "x"},
                ]
            },
            "messages[2].role",
            "a system message must come first",
        ),
    ],
)
def test_corrupted_text_and_turns_templates_refuse_are_bad_rows(tmp_path, row, field, reason):
    """NUL characters, a system message after the start and two user turns in a row: chat templates
    refuse or misplace them, so the row is refused with where and why."""
    good = GOOD["sft"] if "messages" in row else GOOD["preference"]
    (bad,) = load_data(write_jsonl(tmp_path / "d.jsonl", [row, good, good]), on_bad_row="skip").bad_rows
    assert (bad.row, bad.field) == (1, field) and reason in bad.reason


def test_csv_text_that_looks_like_json_stays_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\nReply in JSON.,"{""answer"": 4}",four\n')
    (ex,) = load_data(path).examples
    assert ex.chosen == '{"answer": 4}'
