"""Load a dataset file into typed examples: detect the format, validate each row, apply the policy."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from criteriapo.data.formats import EXPECTED_FIELDS, DataKind, detect_kind, parse_row
from criteriapo.data.layouts import Layout, detect_layout
from criteriapo.data.readers import MAX_ROW_BYTES, RawRow, read_rows
from criteriapo.data.records import BadRow, Example, PreferenceExample, RowProblem, split_pair
from criteriapo.data.validation import apply_policy, check_policy
from criteriapo.errors import DataError

DETECT_ROWS = 1000  # rows looked at to decide the format of a file


@dataclass
class LoadedData:
    """What a load produced: the good examples, the bad rows, and how many rows were read."""

    kind: DataKind
    examples: list[Example]
    bad_rows: list[BadRow]
    rows_read: int
    styles: Counter[str] = field(default_factory=Counter)  # e.g. conversational, implicit prompt
    layout: str | None = None  # another tool's layout the rows were converted from


def detect_format(rows: Sequence[RawRow]) -> DataKind:
    """The most common format among the readable rows."""
    votes = Counter(k for r in rows[:DETECT_ROWS] if r.value is not None and (k := detect_kind(r.value)))
    if not votes:
        fields = sorted({k for r in rows[:DETECT_ROWS] if r.value is not None for k in r.value})
        expected = "; ".join(f"{k}: {v}" for k, v in EXPECTED_FIELDS.items())
        raise DataError(
            f"cannot tell the data format: no row has recognised fields (found "
            f"{', '.join(fields) or 'no readable rows'}). Expected {expected}"
        )
    return votes.most_common(1)[0][0]


def read_data(
    paths: str | Path | Sequence[str | Path],
    *,
    kind: DataKind | str = "auto",
    split: str | None = None,
    max_row_bytes: int | None = MAX_ROW_BYTES,
) -> LoadedData:
    """Read, detect and validate every row; bad rows are collected, no policy applied. A row over
    ``max_row_bytes`` is a bad row, refused before it is parsed. ``kind``: auto (the most common
    format among the rows), or a :class:`DataKind` (or its name)."""
    if kind != "auto" and kind not in tuple(DataKind):
        raise DataError(f"unknown data kind {kind!r}; expected auto or one of {', '.join(DataKind)}")
    if isinstance(paths, str | Path):
        paths = [paths]
    rows = [r for p in paths for r in read_rows(p, split, max_row_bytes)]
    if not rows:
        raise DataError(f"{', '.join(map(str, paths))}: no rows")
    layout = detect_layout([r.value for r in rows[:DETECT_ROWS] if r.value is not None])
    if layout is not None:
        rows = [_converted(r, layout) for r in rows]
    found = detect_format(rows)
    kind = found if kind == "auto" else DataKind(kind)
    if kind == DataKind.PREFERENCE and found == DataKind.MULTI_CRITERIA:
        raise DataError(
            f"{', '.join(map(str, paths))} holds multi-criteria ratings (UltraFeedback-style), "
            "not preference pairs; build pairs from it with a recipe (vanilla, mini or finegrained)"
        )
    examples, bad, styles = [], [], Counter()
    for r in rows:
        if r.problem is not None:
            bad.append(r.problem)
            continue
        try:
            ex = parse_row(kind, r.value, r.ref)
        except RowProblem as p:
            bad.append(BadRow(r.ref.file, r.ref.row, p.field, p.reason))
            continue
        if kind == DataKind.UNPAIRED and isinstance(ex, PreferenceExample):
            examples.extend(split_pair(ex))
        else:
            examples.append(ex)
        styles.update(_styles(ex))
    return LoadedData(kind, examples, bad, len(rows), styles, layout.name if layout else None)


def _converted(row: RawRow, layout: Layout) -> RawRow:
    """A row of another tool's layout as our own; a row it cannot convert is a bad row."""
    if row.value is None:
        return row
    try:
        return RawRow(row.ref, layout.convert(row.value))
    except RowProblem as p:
        reason = f"{p.reason} (the file is in {layout.name} layout)"
        return RawRow(row.ref, None, BadRow(row.ref.file, row.ref.row, p.field, reason))


def load_data(
    paths: str | Path | Sequence[str | Path],
    *,
    kind: DataKind | str = "auto",
    split: str | None = None,
    on_bad_row: str = "error",
    report_path: str | Path | None = None,
    max_row_bytes: int | None = MAX_ROW_BYTES,
) -> LoadedData:
    """:func:`read_data`, then the bad-row policy. ``kind``: auto or a :class:`DataKind`."""
    check_policy(on_bad_row)
    data = read_data(paths, kind=kind, split=split, max_row_bytes=max_row_bytes)
    policy = "error" if not data.examples else on_bad_row  # skipping everything leaves nothing to train on
    apply_policy(data.bad_rows, data.rows_read, policy, stage="reading", report_path=report_path)
    return data


def _styles(ex: Example) -> list[str]:
    out = ["conversational" if ex.conversational else "standard"]
    if isinstance(ex, PreferenceExample):
        if ex.implicit_prompt:
            out.append("implicit prompt")
        if ex.criterion is not None:
            out.append("criterion-tagged")
        if ex.criteria_labels:
            out.append("per-criterion labels")
    return out
