"""Hostile data, property-based: files mixing good rows with rows that are broken in every way we
could think of (wrong types, missing fields, empty and huge strings, invalid UTF-8, chosen equal to
rejected, wrong roles, nested junk, prompts longer than max_length under ``long_prompts: error``).
Whatever the mix, reading and
tokenizing with ``on_bad_row: skip`` raises nothing, reports every bad row (by row number) and keeps
every good row; with ``error`` it raises one of our errors naming the rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from criteriapo.data.loading import load_data
from criteriapo.data.tokenize import TokenizeOptions, tokenize_examples
from criteriapo.errors import CriteriaPOError

MAX_LENGTH = 96
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# plain words: no leading/trailing space, no control tokens, so a good row is good for certain
word = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789éü中", min_size=1, max_size=8
)
sentence = st.lists(word, min_size=1, max_size=6).map(" ".join)
junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def good_row(draw) -> dict:
    prompt, chosen = draw(sentence), draw(sentence)
    rejected = draw(sentence)
    rejected = rejected if rejected != chosen else rejected + " instead"
    if draw(st.booleans()):  # huge completions are fine: they are cut to max_length
        chosen = chosen + " long" * draw(st.sampled_from([0, 2000]))
    if draw(st.booleans()):  # conversational
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


@st.composite
def bad_row(draw, parquet: bool = False) -> dict | bytes:
    """A row that is unusable for certain, built from a good one."""
    row = draw(good_row())
    conversational = isinstance(row["chosen"], list)
    kinds = ["null", "equal", "empty", "huge_prompt"]
    if not parquet:  # a Parquet column has one type for every row
        kinds += ["wrong_type", "missing", "nested_junk", "utf8", "not_json"]
    if conversational:
        kinds += ["bad_role"]
    kind = draw(st.sampled_from(kinds))
    event(kind)
    field = draw(st.sampled_from(["chosen", "rejected"]))
    if kind == "null":
        row[field] = None
    elif kind == "equal":
        row["rejected"] = row["chosen"]
    elif kind == "empty":
        if conversational:
            row[field][0]["content"] = draw(st.sampled_from(["", "   ", "\n"]))
        else:
            row[field] = draw(st.sampled_from(["", "   ", "\n"]))
    elif kind == "huge_prompt":
        text = "word " * (MAX_LENGTH * 3)
        row["prompt"] = [{"role": "user", "content": text}] if conversational else text
    elif kind == "wrong_type":
        row[field] = draw(st.integers() | st.floats() | st.booleans() | st.lists(st.integers(), max_size=3))
    elif kind == "missing":
        del row[field]
    elif kind == "nested_junk":
        row[field] = draw(st.dictionaries(st.text(max_size=4), junk, min_size=1, max_size=3))
    elif kind == "bad_role":
        row[field][0]["role"] = draw(st.sampled_from(["narrator", "", "USER ", "robot"]))
    elif kind == "utf8":
        return json.dumps(row).encode()[:-1] + b"\xff\xfe" + b"}"
    elif kind == "not_json":
        return json.dumps(row).encode()[: draw(st.integers(1, 20))]
    return row


@st.composite
def mixed(draw, parquet: bool = False):
    """Rows in a random order, good ones the majority (so the format is recognised); returns the rows
    and the 1-based row numbers of the bad ones."""
    bad = draw(st.lists(bad_row(parquet), max_size=6))
    good = draw(st.lists(good_row(), min_size=len(bad) + 1, max_size=len(bad) + 6))
    if parquet:  # one type per column: all conversational or all standard
        style = isinstance(good[0]["chosen"], list)
        good = [g for g in good if isinstance(g["chosen"], list) == style] or good[:1]
        bad = [b for b in bad if isinstance(b.get("prompt"), list) == style][: len(good) - 1]
    tagged = [(r, False) for r in good] + [(r, True) for r in bad]
    order = draw(st.permutations(range(len(tagged))))
    rows = [tagged[i] for i in order]
    return [r for r, _ in rows], {i + 1 for i, (_, is_bad) in enumerate(rows) if is_bad}


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("wb") as f:
        for r in rows:
            f.write((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load_and_tokenize(path: Path, chat_tokenizer, policy: str, report: Path):
    data = load_data(path, kind="preference", on_bad_row=policy, report_path=report)
    opts = TokenizeOptions(max_length=MAX_LENGTH, long_prompts="error")  # a huge prompt is a bad row
    return tokenize_examples(data.examples, chat_tokenizer, opts, on_bad_row=policy, report_path=report)


def check_file(path: Path, bad_rows: set[int], n: int, chat_tokenizer, tmp: Path) -> None:
    report = tmp / "bad_rows.jsonl"
    report.unlink(missing_ok=True)
    kept = load_and_tokenize(path, chat_tokenizer, "skip", report)
    reported = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    assert {r["row"] for r in reported} == bad_rows  # every bad row reported ...
    assert len(reported) == len(bad_rows)  # ... once
    assert all(r["file"] == str(path) and r["reason"] for r in reported)
    assert sorted(p.source.row for p in kept) == sorted(
        set(range(1, n + 1)) - bad_rows
    )  # every good row kept
    if bad_rows:
        with pytest.raises(CriteriaPOError) as err:
            load_and_tokenize(path, chat_tokenizer, "error", tmp / "unused.jsonl")
        assert f"row {min(bad_rows)}" in str(err.value) or "rows cannot be used" in str(err.value)


@FUZZ
@given(case=mixed())
def test_jsonl_rows_of_every_kind_of_wrong(case, chat_tokenizer, tmp_path):
    rows, bad = case
    event(f"{len(bad)} bad of {len(rows)}")
    check_file(write_jsonl(tmp_path / "data.jsonl", rows), bad, len(rows), chat_tokenizer, tmp_path)


@FUZZ
@given(case=mixed(parquet=True))
def test_parquet_rows_of_every_kind_of_wrong(case, chat_tokenizer, tmp_path):
    rows, bad = case
    check_file(write_parquet(tmp_path / "data.parquet", rows), bad, len(rows), chat_tokenizer, tmp_path)


@FUZZ
@given(rows=st.lists(bad_row(), min_size=1, max_size=5))
def test_files_with_no_usable_row_stop_with_our_error(rows, chat_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(CriteriaPOError):
        load_and_tokenize(path, chat_tokenizer, "skip", tmp_path / "report.jsonl")
