"""The bad-row policy: ``error`` (default) stops with every bad row listed; ``skip`` keeps every
good row and writes a report of what was skipped and why. Never a silent drop."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from criteriapo.data.records import BadRow
from criteriapo.errors import ConfigError, DataError

BadRowPolicy = Literal["error", "skip"]
POLICIES = ("error", "skip")
SHOWN = 20
log = logging.getLogger(__name__)


class BadRowsError(DataError):
    """Some rows are unusable and the policy is ``error``."""

    def __init__(self, bad_rows: list[BadRow], total: int, stage: str):
        self.bad_rows = bad_rows
        lines = [f"{len(bad_rows)} of {total} rows cannot be used ({stage}):"]
        groups = summarize(bad_rows)
        lines += [f"  {g}" for g in groups[:SHOWN]]
        if len(groups) > SHOWN:
            rest = sum(g.count for g in groups[SHOWN:])
            lines.append(f"  ... and {rest} more (`criteriapo data check FILE` lists them all)")
        if len(bad_rows) < total:
            lines.append(
                "Fix these rows, or set on_bad_row: skip to train on the good rows "
                "(a report of the skipped rows is written)."
            )
        else:
            lines.append("No row is usable: check that this is the right file, and the expected format.")
        super().__init__("\n".join(lines))


@dataclass
class Problem:
    """Bad rows of one file that fail the same way: said once, with their count and row numbers."""

    first: BadRow
    rows: list[int]

    @property
    def count(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        if self.count == 1:
            return str(self.first)
        shown = ", ".join(map(str, self.rows[:5])) + (", ..." if self.count > 5 else "")
        field = f", field '{self.first.field}'" if self.first.field else ""
        return f"{self.first.file}, {self.count} rows ({shown}){field}: {self.first.reason}"


def summarize(bad_rows: list[BadRow]) -> list[Problem]:
    """Bad rows grouped by file, field and reason, in the order each first appears."""
    groups: dict[tuple, Problem] = {}
    for b in bad_rows:
        key = (b.file, b.field, b.reason)
        if key in groups:
            groups[key].rows.append(b.row)
        else:
            groups[key] = Problem(b, [b.row])
    return list(groups.values())


def check_policy(policy: str) -> BadRowPolicy:
    if policy not in POLICIES:
        raise ConfigError(f"on_bad_row must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy  # type: ignore[return-value]


def apply_policy(
    bad_rows: list[BadRow], total: int, policy: str, *, stage: str, report_path: str | Path | None = None
) -> None:
    """Raise for ``error``; for ``skip``, append the bad rows to ``report_path`` and log a warning."""
    if not bad_rows:
        return
    if check_policy(policy) == "error":
        raise BadRowsError(bad_rows, total, stage)
    where = ""
    if report_path is not None:
        write_report(bad_rows, report_path)
        where = f"; report: {report_path}"
    log.warning("skipped %d of %d rows (%s)%s; first: %s", len(bad_rows), total, stage, where, bad_rows[0])


def write_report(bad_rows: list[BadRow], path: str | Path) -> None:
    """Append one JSON object per bad row to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for b in bad_rows:
            f.write(json.dumps(b.to_dict()) + "\n")
