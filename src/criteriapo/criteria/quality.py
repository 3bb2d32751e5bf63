"""Quality guards on a reply, whatever criteria it is judged on: a reply that loops, is empty, or was
cut off by the token limit is not one a person would accept, so it never becomes a chosen reply,
and evaluation reports how often each happens (with the mean length) beside the pass rates.

Degenerate repetition is defined on tokens (lowercased words, and each punctuation mark on its own):
a span of ``n`` tokens (1 <= n <= 32) with a letter in it, repeated back to back, ``k`` times in
all, with k >= 4, or k >= 3 when the span has 3 tokens or more; the last copy may stop anywhere
after its first token, as a loop cut off mid-way does, so a sentence said twice and begun a third
time counts. Code (fenced or inline) and markdown table rows are left out: their repetition is
syntax. "unforgiving, unforgiving, unforgiving, unforgiving", "TED-TED-TED-TED", a sentence said
three times in a row, and two identical bullets followed by a third that starts like them loop;
"very, very good", "no, no, no" and a bulleted list whose items share their first words do not.

**Unasked format** is formatting a person did not ask for: a ``<<title>>``, the whole reply in
double quotes, a JSON reply, a ``P.S.`` line, or a reply in capital letters, when the prompt's
criteria do not ask for it. A tuned model that learned "add a title" instead of "add a title when
asked" shows it; evaluation reports its rate. The made data rates both (``as_asked``: 1 when a reply
neither loops nor shows unasked format), so that decoys of either kind teach against them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from criteriapo.criteria.library import FIXED, words

_TOKEN = re.compile(r"\w+|[^\w\s]")
_CODE = re.compile(r"```.*?(```|$)|`[^`\n]*`", re.DOTALL)  # fenced blocks (closed or cut off), inline
MAX_SPAN = 32  # a sentence said three times in a row loops too


def _tokens(text: str) -> list[str]:
    """Lowercased words and punctuation marks of the prose: code and markdown table rows, whose
    repetition is their syntax, are left out."""
    prose = _CODE.sub(" ", text)
    prose = "\n".join(line for line in prose.splitlines() if not line.lstrip().startswith("|"))
    return _TOKEN.findall(prose.lower())


def repeated_span(text: str) -> str | None:
    """The span that loops (as its tokens joined by spaces), or None when the text does not loop.
    A cut-off last copy counts: the run needs k - 1 copies and the first token of the last. A span without
    a letter (punctuation, digits, emoji: "!!!!", "----", "0, 0, 0, 0") is not a loop."""
    toks = _tokens(text)
    for n in range(1, MAX_SPAN + 1):
        need = (4 if n < 3 else 3) * n - (n - 1)  # tokens of the periodic run
        run = n  # tokens in the current run of period n
        for j in range(n, len(toks)):
            run = run + 1 if toks[j] == toks[j - n] else n
            if run >= need:
                start = j - run + 1
                span = toks[start : start + n]
                if any(any(ch.isalpha() for ch in t) for t in span):
                    return " ".join(span)
    return None


UNASKED = ("title", "quoted", "json", "postscript", "uppercase")  # criterion families
AS_ASKED = "as_asked"  # the rating the made data gives: 1 when a reply neither loops nor has unasked format
AS_ASKED_DESCRIPTION = "Say each thing once, with no formatting that was not asked for."


def unasked_format(text: str, asked: Iterable[str]) -> list[str]:
    """The format families of :data:`UNASKED` that ``text`` shows although ``asked`` (criterion
    names or families) does not ask for them. All capitals counts from three words on; JSON is an
    object, an array or a fenced block."""
    asked_families = {a.partition(":")[0] for a in asked}
    found = []
    for family in UNASKED:
        if family in asked_families or not text.strip():
            continue
        if family == "uppercase" and len([w for w in words(text) if any(c.isalpha() for c in w)]) < 3:
            continue
        if family == "json" and not text.lstrip().startswith(("{", "[", "```")):
            continue  # a quoted sentence is a JSON string, but nobody reads it as a JSON reply
        if FIXED[family].check(text):
            found.append(family)
    return found


@dataclass(frozen=True)
class ReplyQuality:
    words: int
    empty: bool
    loop: str | None  # the repeated span, when the reply loops
    cut_off: bool  # generation stopped at the token limit, not at the end of the reply
    unasked: tuple[str, ...] = ()  # format families shown but not asked for

    @property
    def ok(self) -> bool:
        return not (self.empty or self.loop or self.cut_off or self.unasked)

    def problems(self) -> list[str]:
        return [
            *(["empty"] if self.empty else []),
            *([f"repeats {self.loop!r}"] if self.loop else []),
            *(["cut off by the token limit"] if self.cut_off else []),
            *([f"unasked {', '.join(self.unasked)}"] if self.unasked else []),
        ]


def reply_quality(text: str, cut_off: bool = False, asked: Iterable[str] | None = None) -> ReplyQuality:
    """The guards on one reply; with ``asked`` (the prompt's criteria) also its unasked format."""
    unasked = tuple(unasked_format(text, asked)) if asked is not None else ()
    return ReplyQuality(
        len(re.findall(r"\w+", text)), not text.strip(), repeated_span(text), cut_off, unasked
    )


@functools.lru_cache(maxsize=1 << 16)
def acceptable(text: str) -> bool:
    """Whether a reply may be a chosen one (what can be told from its text: not empty, no loop).
    Cached: the recipes ask it of every reply once per criterion."""
    return bool(text.strip()) and repeated_span(text) is None


def quality_summary(qualities: Sequence[ReplyQuality]) -> dict[str, float]:
    """Rates over replies (0 to 1) and the mean length in words."""
    n = max(1, len(qualities))
    return {
        "repetition_rate": sum(q.loop is not None for q in qualities) / n,
        "empty_rate": sum(q.empty for q in qualities) / n,
        "cut_off_rate": sum(q.cut_off for q in qualities) / n,
        "unasked_format_rate": sum(bool(q.unasked) for q in qualities) / n,
        "mean_words": sum(q.words for q in qualities) / n,
    }
