"""Read raw rows from JSONL, JSON, Parquet, CSV files and saved `datasets` folders.

Readers never raise for one bad row: an unreadable row comes back with a :class:`BadRow` so the
caller's bad-row policy decides. Only a file that cannot be read at all raises :class:`DataError`.

A row larger than ``max_row_bytes`` is a bad row, refused before it is parsed: a JSONL line is
measured as it is read and skipped without being held in memory, so memory stays bounded by the
limit; rows of other formats are measured by the characters of their text once read.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from criteriapo.config import DataConfig
from criteriapo.data.hub import HubSpec, is_dataset_repo, parse_hub, read_hub, read_repo_folder
from criteriapo.data.records import BadRow, RowRef
from criteriapo.errors import DataError

SUPPORTED = (
    ".jsonl, .ndjson, .json, .parquet, .csv, a folder written by datasets' save_to_disk, a clone of a "
    "dataset repository, or a Hub dataset in the local cache (hub:OWNER/NAME)"
)
MAX_ROW_BYTES = DataConfig.max_row_bytes  # the default of data.max_row_bytes
_SKIP_CHUNK = 2**20


@dataclass
class RawRow:
    ref: RowRef
    value: dict[str, Any] | None
    problem: BadRow | None = None


def read_rows(
    path: str | Path, split: str | None = None, max_row_bytes: int | None = MAX_ROW_BYTES
) -> Iterator[RawRow]:
    """Yield every row of ``path`` in file order; rows over ``max_row_bytes`` (None: no limit) as
    bad rows."""
    limit = max_row_bytes or None
    spec = parse_hub(path) if isinstance(path, str) else None
    path = Path(path)
    if spec is None and path.suffix.lower() in (".jsonl", ".ndjson") and path.is_file():
        yield from _read_jsonl(path, limit)  # measured in bytes as each line is read
        return
    for row in _read_hub(spec, split) if spec is not None else _read_any(path, split):
        if limit is not None and row.value is not None and (size := _text_size(row.value)) > limit:
            yield RawRow(row.ref, None, _too_large(row.ref, f"{size:,} characters of text", limit))
        else:
            yield row


def _too_large(ref: RowRef, size: str, limit: int) -> BadRow:
    return BadRow(
        ref.file,
        ref.row,
        None,
        f"row too large ({size}, over data.max_row_bytes {limit:,}); shorten it, or raise the limit",
    )


def _text_size(value: Any) -> int:
    """Characters of text in a row: its strings, keys included, at any depth."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(k)) + _text_size(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(_text_size(v) for v in value)
    return 0


def _read_any(path: Path, split: str | None) -> Iterator[RawRow]:
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir() and is_dataset_repo(path):  # a clone of a dataset repository
        label, rows = read_repo_folder(path, split)
        yield from (_object_row(RowRef(label, i), v) for i, v in enumerate(rows, start=1))
        return
    if path.is_dir():
        yield from _read_saved_dataset(path, split)
        return
    suffix = path.suffix.lower()
    readers = {
        ".jsonl": _read_jsonl,
        ".ndjson": _read_jsonl,
        ".json": _read_json,
        ".parquet": _read_parquet,
        ".csv": _read_csv,
    }
    if suffix not in readers:
        raise DataError(f"{path}: unknown data file type '{suffix}'; use {SUPPORTED}")
    yield from readers[suffix](path)


def _read_hub(spec: HubSpec, split: str | None) -> Iterator[RawRow]:
    label, rows = read_hub(spec, split)
    for i, value in enumerate(rows, start=1):
        yield _object_row(RowRef(label, i), value)


def _object_row(ref: RowRef, value: Any) -> RawRow:
    if isinstance(value, dict):
        return RawRow(ref, value)
    kind = type(value).__name__ if value is not None else "null"
    return RawRow(
        ref, None, BadRow(ref.file, ref.row, None, f"expected an object with named fields, got {kind}")
    )


def _parse_json_line(ref: RowRef, raw: bytes) -> RawRow:
    try:
        text = raw.decode("utf-8").strip().removeprefix("\ufeff")  # a byte-order mark opens some files
    except UnicodeDecodeError as e:
        return RawRow(
            ref, None, BadRow(ref.file, ref.row, None, f"not valid UTF-8 (byte {e.start + 1} of the line)")
        )
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return RawRow(
            ref, None, BadRow(ref.file, ref.row, None, f"not valid JSON ({e.msg}, column {e.colno})")
        )
    except RecursionError:
        return RawRow(ref, None, BadRow(ref.file, ref.row, None, "JSON nested too deeply to read"))
    except ValueError as e:  # e.g. an integer too long to convert
        return RawRow(ref, None, BadRow(ref.file, ref.row, None, f"not readable JSON ({e})"))
    return _object_row(ref, value)


def _read_jsonl(path: Path, limit: int | None = None) -> Iterator[RawRow]:
    with path.open("rb") as f:
        lineno = 0
        while raw := f.readline(-1 if limit is None else limit + 1):
            lineno += 1
            ref = RowRef(str(path), lineno)
            if limit is not None and len(raw) > limit and not raw.endswith(b"\n"):
                size = len(raw)
                while (chunk := f.readline(_SKIP_CHUNK)) and not chunk.endswith(b"\n"):
                    size += len(chunk)  # the rest of the line, read and dropped
                size += len(chunk)
                yield RawRow(ref, None, _too_large(ref, f"{size:,} bytes", limit))
            elif raw.strip():
                yield _parse_json_line(ref, raw)


def _read_json(path: Path) -> Iterator[RawRow]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not valid UTF-8 at line {line} (byte {e.start}); fix the file or "
            "save it as JSONL so that only the bad rows are reported"
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line in a .json file: read it as JSONL
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read") from None
    except ValueError as e:
        raise DataError(f"{path}: not readable JSON ({e})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(
            f"{path}: expected a JSON array of objects (or JSONL, one object per line), "
            f"got {type(value).__name__}"
        )
    for i, item in enumerate(value, start=1):
        yield _object_row(RowRef(str(path), i), item)


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for value in batch.to_pylist():
                row += 1
                yield _object_row(RowRef(str(path), row), value)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataError(f"{path}: cannot read as Parquet: {e}") from None


OBJECT_FIELDS = ("ratings", "annotations", "criteria_labels")


def _maybe_json_cell(key: str, cell: str) -> Any:
    """CSV has no nesting: a cell holding a JSON list of objects is decoded, and a JSON object is
    decoded in the fields that hold objects; other text stays text."""
    s = cell.strip()
    if not s or s[0] not in "[{":
        return cell
    try:
        value = json.loads(s)
    except (ValueError, RecursionError):
        return cell
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return value
    if isinstance(value, dict) and key in OBJECT_FIELDS:
        return value
    return cell


def _read_csv(path: Path) -> Iterator[RawRow]:
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad cell is one bad row
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    csv.field_size_limit(2**31 - 1)  # long replies are normal; the default 128 KiB cap is not
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fieldnames = reader.fieldnames
        if not fieldnames:
            raise DataError(f"{path}: empty CSV file (a header row naming the fields is needed)")
        for i, row in enumerate(reader, start=1):
            ref = RowRef(str(path), i)
            if None in row:
                yield RawRow(
                    ref,
                    None,
                    BadRow(ref.file, i, None, f"more cells than the {len(fieldnames)} header fields"),
                )
                continue
            missing = [k for k, v in row.items() if v is None]
            if missing:
                yield RawRow(
                    ref, None, BadRow(ref.file, i, missing[0], "row has fewer cells than the header")
                )
                continue
            bad = next((k for k, v in row.items() if _has_surrogate(v)), None)
            if bad is not None:
                yield RawRow(ref, None, BadRow(ref.file, i, bad, "not valid UTF-8"))
                continue
            yield RawRow(ref, {k: _maybe_json_cell(k, v) for k, v in row.items()})
    except csv.Error as e:
        raise DataError(f"{path}: cannot read as CSV: {e}") from None


def _has_surrogate(s: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in s)


def _read_saved_dataset(path: Path, split: str | None) -> Iterator[RawRow]:
    import datasets

    if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        raise DataError(
            f"{path}: a folder, but not one written by datasets' save_to_disk; "
            f"pass a file instead ({SUPPORTED})"
        )
    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged or foreign folder
        raise DataError(f"{path}: cannot load the saved dataset: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        if split is None:
            split = "train" if "train" in ds else (names[0] if len(names) == 1 else None)
        if split not in ds:
            raise DataError(
                f"{path}: split {split!r} not found; this dataset has {names}; choose one with split"
            )
        ds = ds[split]
    label = f"{path}[{split}]" if split else str(path)
    for i, value in enumerate(ds, start=1):
        yield _object_row(RowRef(label, i), value)
