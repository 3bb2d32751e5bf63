"""Every file format loads into the same examples."""

from __future__ import annotations

import csv
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from criteriapo.data.loading import load_data
from criteriapo.data.readers import read_rows
from criteriapo.errors import DataError
from tests.helpers import write_jsonl

ROWS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
]
CONV_ROWS = [
    {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    },
]


def _same(loaded, rows):
    assert loaded.kind == "preference"
    assert [(e.prompt, e.chosen, e.rejected) for e in loaded.examples] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in rows
    ]
    assert [e.source.row for e in loaded.examples] == list(range(1, len(rows) + 1))


def test_jsonl(tmp_path):
    _same(load_data(write_jsonl(tmp_path / "d.jsonl", ROWS)), ROWS)


def test_jsonl_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert [e.source.row for e in load_data(path).examples] == [1, 3]


def test_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS))
    _same(load_data(path), ROWS)


def test_json_file_holding_json_lines(tmp_path):
    _same(load_data(write_jsonl(tmp_path / "d.json", ROWS)), ROWS)


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    _same(load_data(path), ROWS)


def test_parquet_conversational(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(CONV_ROWS), path)
    loaded = load_data(path)
    assert loaded.examples[0].chosen == CONV_ROWS[0]["chosen"]
    assert loaded.styles["conversational"] == 1


def test_csv_with_json_cells(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(ROWS)
        w.writerow({k: json.dumps(v) for k, v in CONV_ROWS[0].items()})
    loaded = load_data(path)
    assert loaded.examples[0].chosen == "4"
    assert loaded.examples[2].chosen == CONV_ROWS[0]["chosen"]


def test_csv_keeps_bracketed_text_as_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\n"[1, 2, 3] sorted?",yes,no\n')
    assert load_data(path).examples[0].prompt == "[1, 2, 3] sorted?"


def test_saved_dataset_folder(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "ds")
    _same(load_data(tmp_path / "ds"), ROWS)


def test_saved_dataset_dict_picks_split(tmp_path):
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    ).save_to_disk(tmp_path / "dd")
    assert len(load_data(tmp_path / "dd").examples) == 2
    assert len(load_data(tmp_path / "dd", split="test").examples) == 1
    with pytest.raises(DataError, match=r"split 'dev' not found.*\['train', 'test'\]"):
        load_data(tmp_path / "dd", split="dev")


def test_several_files_in_one_load(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    b = write_jsonl(tmp_path / "b.jsonl", ROWS[1:])
    loaded = load_data([a, b])
    assert [e.source.file for e in loaded.examples] == [str(a), str(b)]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("d.txt", b"x", r"unknown data file type '.txt'"),
        ("d.json", b'{"a": 1', r"not valid JSON: .* line 1"),
        ("d.json", b'"just a string"', r"expected a JSON array of objects"),
        ("d.json", b'[{"prompt": "caf\xe9"}]', r"not valid UTF-8 at line 1"),
        ("d.parquet", b"not parquet at all", r"cannot read as Parquet"),
        ("d.csv", b"", r"empty CSV file"),
    ],
)
def test_unreadable_files_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        list(read_rows(path))
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_data(tmp_path / "nope.jsonl")


def test_plain_folder_is_refused(tmp_path):
    (tmp_path / "f").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        load_data(tmp_path / "f")


def test_a_row_over_the_size_limit_is_a_bad_row_read_in_bounded_memory(tmp_path):
    import tracemalloc

    huge = {"prompt": "word " * 4_000_000, "chosen": "a", "rejected": "b"}  # a 20 MB line
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], huge, ROWS[1]])
    tracemalloc.start()
    try:
        loaded = load_data(path, on_bad_row="skip", max_row_bytes=100_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20  # the line is never held whole: a 1 MiB chunk at a time
    assert [e.prompt for e in loaded.examples] == [r["prompt"] for r in ROWS]
    (bad,) = loaded.bad_rows
    size = len(json.dumps(huge)) + 1
    assert bad.row == 2 and f"row too large ({size:,} bytes, over data.max_row_bytes 100,000)" in bad.reason
    # the next row's line number is still right, and without a limit the row is read
    assert [e.source.row for e in loaded.examples] == [1, 3]
    assert len(load_data(path, max_row_bytes=None).examples) == 3


def test_rows_of_other_formats_are_measured_by_their_text(tmp_path):
    pq.write_table(pa.Table.from_pylist([ROWS[0], {**ROWS[1], "prompt": "x" * 5000}]), tmp_path / "d.parquet")
    rows = list(read_rows(tmp_path / "d.parquet", max_row_bytes=1000))
    assert (
        rows[0].problem is None
        and "5," in rows[1].problem.reason
        and "characters of text" in rows[1].problem.reason
    )
