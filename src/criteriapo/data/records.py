"""Typed records that every loader produces, whatever the file format.

Text is either *standard* (plain strings, tokenized as they are) or *conversational* (lists of
``{"role", "content"}`` messages, rendered through the tokenizer's chat template), in TRL's sense.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]
Text = str | list[Message]


@dataclass(frozen=True)
class RowRef:
    """Where a record came from. Rows are 1-based; in JSONL files the row is the line number."""

    file: str
    row: int

    def __str__(self) -> str:
        return f"{self.file}, row {self.row}"


@dataclass(frozen=True)
class BadRow:
    """One row that cannot be used, and why."""

    file: str
    row: int
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}, row {self.row}"
        if self.field:
            where += f", field '{self.field}'"
        return f"{where}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "row": self.row, "field": self.field, "reason": self.reason}


class RowProblem(Exception):
    """Raised by a row parser; the loader turns it into a :class:`BadRow`."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def is_conversational(text: Text) -> bool:
    return isinstance(text, list)


@dataclass
class PreferenceExample:
    """A prompt with a preferred (chosen) and a dispreferred (rejected) completion.

    ``criterion`` tags a pair judged on one criterion (with its loss ``weight``);
    ``criteria_labels`` holds per-criterion verdicts: +1 chosen better, -1 rejected better, 0 tie.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    source: RowRef
    criterion: str | None = None
    weight: float = 1.0
    criteria_labels: dict[str, int] | None = None
    implicit_prompt: bool = False  # the prompt was the shared beginning of chosen and rejected

    @property
    def conversational(self) -> bool:
        return is_conversational(self.chosen)


@dataclass
class SFTExample:
    """A supervised example. Loss falls on ``completion`` only.

    Conversational: ``prompt`` is the messages before the first assistant turn and ``completion``
    the rest; every assistant message in ``completion`` is trained, other roles are masked.
    Standard: two strings. Plain text (``text`` rows): empty prompt, the text as completion.
    """

    prompt: Text
    completion: Text
    source: RowRef

    @property
    def conversational(self) -> bool:
        return is_conversational(self.completion)


@dataclass
class UnpairedExample:
    """A prompt and one completion labelled desirable (``label`` true) or undesirable: KTO's data,
    TRL's unpaired format. A preference pair is two of them."""

    prompt: Text
    completion: Text
    label: bool
    source: RowRef

    @property
    def conversational(self) -> bool:
        return is_conversational(self.completion)


def split_pair(ex: PreferenceExample) -> list[UnpairedExample]:
    """A pair as KTO reads it: the chosen completion desirable, the rejected one undesirable."""
    return [
        UnpairedExample(ex.prompt, ex.chosen, True, ex.source),
        UnpairedExample(ex.prompt, ex.rejected, False, ex.source),
    ]


@dataclass
class RatedCompletion:
    """One candidate response with a score per criterion (``None``: not rated, e.g. "N/A")."""

    response: str
    ratings: dict[str, float | None]
    overall: float | None = None
    model: str | None = None
    cut_off: bool = False  # the token limit stopped it: never a chosen response


@dataclass
class MultiCriteriaExample:
    """UltraFeedback-style: one prompt, several completions, each rated on several criteria."""

    prompt: Text
    completions: list[RatedCompletion]
    source: RowRef
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return is_conversational(self.prompt)

    @property
    def criteria(self) -> list[str]:
        names: dict[str, None] = {}
        for c in self.completions:
            names.update(dict.fromkeys(c.ratings))
        return list(names)


Example = PreferenceExample | SFTExample | MultiCriteriaExample | UnpairedExample
