"""A library of verifiable criteria in the style of instruction-following evaluations.

A criterion has a name, a description (the instruction as a user would write it) and a checker:
response text (and optionally the prompt) -> pass or fail. Criteria are made by families with a
parameter, and named by specs such as ``max_words:20``, ``no_commas``, ``include:apple|pear``.
An empty or whitespace-only response fails every criterion: it follows no instruction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from criteriapo.errors import ConfigError

Checker = Callable[[str], bool]


@dataclass(frozen=True)
class Criterion:
    name: str  # the spec that recreates it, e.g. "max_words:20"
    description: str  # the instruction, e.g. "Answer in at most 20 words."
    check: Checker | None = field(default=None, compare=False)  # None: judged by ratings only

    @property
    def verifiable(self) -> bool:
        return self.check is not None

    def passes(self, response: str) -> bool:
        if self.check is None:
            raise ValueError(f"criterion {self.name!r} has no checker; it is judged by ratings")
        return bool(response.strip()) and self.check(response)


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*", text)


def sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    return [p for p in parts if words(p)]


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def bullets(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r"^\s*[-*•]\s+\S", line)]


def _keywords(arg: str) -> list[str]:
    kws = [k.strip() for k in arg.split("|") if k.strip()]
    if not kws:
        raise ValueError("needs at least one keyword, e.g. include:apple|pear")
    return kws


def _has_word(text: str, kw: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(kw)}(?![A-Za-z0-9])", text, re.IGNORECASE) is not None


def _json_ok(text: str) -> bool:
    s = text.strip()
    if s.startswith("```"):  # a fenced block counts when its body is JSON
        s = re.sub(r"^```(?:json)?\s*|\s*```$", "", s)
    try:
        json.loads(s)
    except ValueError:
        return False
    return True


def _int(arg: str, name: str) -> int:
    try:
        n = int(arg)
    except ValueError:
        raise ValueError(f"{name} needs a whole number, e.g. {name}:3") from None
    if n < 1:
        raise ValueError(f"{name} needs a number >= 1, got {n}")
    return n


# family -> (builder from the argument string, whether it takes an argument)
def _max_words(a: str) -> Criterion:
    n = _int(a, "max_words")
    return Criterion(f"max_words:{n}", f"Answer in at most {n} words.", lambda r: len(words(r)) <= n)


def _min_words(a: str) -> Criterion:
    n = _int(a, "min_words")
    return Criterion(f"min_words:{n}", f"Answer in at least {n} words.", lambda r: len(words(r)) >= n)


def _max_sentences(a: str) -> Criterion:
    n = _int(a, "max_sentences")
    return Criterion(
        f"max_sentences:{n}", f"Use at most {n} sentence{'s' * (n > 1)}.", lambda r: len(sentences(r)) <= n
    )


def _paragraphs(a: str) -> Criterion:
    n = _int(a, "paragraphs")
    return Criterion(
        f"paragraphs:{n}",
        f"Write exactly {n} paragraphs separated by blank lines.",
        lambda r: len(paragraphs(r)) == n,
    )


def _bullets(a: str) -> Criterion:
    n = _int(a, "bullets")
    return Criterion(
        f"bullets:{n}",
        f"Answer with exactly {n} bullet point{'s' * (n > 1)} starting with '- '.",
        lambda r: len(bullets(r)) == n,
    )


def _include(a: str) -> Criterion:
    kws = _keywords(a)
    return Criterion(
        f"include:{'|'.join(kws)}",
        f"Include the word{'s' * (len(kws) > 1)} {', '.join(kws)}.",
        lambda r: all(_has_word(r, k) for k in kws),
    )


def _avoid(a: str) -> Criterion:
    kws = _keywords(a)
    return Criterion(
        f"avoid:{'|'.join(kws)}",
        f"Do not use the word{'s' * (len(kws) > 1)} {', '.join(kws)}.",
        lambda r: not any(_has_word(r, k) for k in kws),
    )


def _starts_with(a: str) -> Criterion:
    if not a.strip():
        raise ValueError("starts_with needs a phrase, e.g. starts_with:Answer:")
    return Criterion(f"starts_with:{a}", f"Start your reply with '{a}'.", lambda r: r.lstrip().startswith(a))


def _ends_with(a: str) -> Criterion:
    if not a.strip():
        raise ValueError("ends_with needs a phrase, e.g. ends_with:Done.")
    return Criterion(f"ends_with:{a}", f"End your reply with '{a}'.", lambda r: r.rstrip().endswith(a))


FIXED = {
    "lowercase": Criterion(
        "lowercase",
        "Write your whole reply in lowercase letters.",
        lambda r: r == r.lower() and any(c.isalpha() for c in r),
    ),
    "uppercase": Criterion(
        "uppercase",
        "Write your whole reply in capital letters.",
        lambda r: r == r.upper() and any(c.isalpha() for c in r),
    ),
    "no_commas": Criterion("no_commas", "Do not use any commas.", lambda r: "," not in r),
    "json": Criterion("json", "Reply with valid JSON only.", _json_ok),
    "title": Criterion(
        "title",
        "Give your reply a title wrapped in double angular brackets, like <<title>>.",
        lambda r: re.search(r"<<[^<>\n]+>>", r) is not None,
    ),
    "quoted": Criterion(
        "quoted",
        "Wrap your whole reply in double quotes.",
        lambda r: len(r.strip()) >= 2 and r.strip()[0] == '"' and r.strip()[-1] == '"',
    ),
    "postscript": Criterion(
        "postscript",
        "End with a postscript starting with P.S.",
        lambda r: re.search(r"(?m)^\s*P\.S\.", r) is not None,
    ),
}
WITH_ARG: dict[str, Callable[[str], Criterion]] = {
    "max_words": _max_words,
    "min_words": _min_words,
    "max_sentences": _max_sentences,
    "paragraphs": _paragraphs,
    "bullets": _bullets,
    "include": _include,
    "avoid": _avoid,
    "starts_with": _starts_with,
    "ends_with": _ends_with,
}
FAMILIES = sorted([*FIXED, *WITH_ARG])


def parse_criterion(spec: str) -> Criterion:
    """``lowercase``, ``max_words:20``, ``include:apple|pear`` ... -> a Criterion."""
    family, sep, arg = spec.strip().partition(":")
    if family in FIXED and not sep:
        return FIXED[family]
    if family in WITH_ARG and sep:
        try:
            return WITH_ARG[family](arg)
        except ValueError as e:
            raise ConfigError(f"criterion {spec!r}: {e}") from None
    if family in WITH_ARG:
        raise ConfigError(f"criterion {spec!r}: {family} needs a value, e.g. {family}:3")
    if family in FIXED:
        raise ConfigError(f"criterion {spec!r}: {family} takes no value")
    raise ConfigError(f"unknown criterion {spec!r}; families: {', '.join(FAMILIES)}")


def parse_criteria(specs: str) -> list[Criterion]:
    """Specs separated by ';': ``max_words:20;no_commas``."""
    return [parse_criterion(p) for p in specs.split(";") if p.strip()]
