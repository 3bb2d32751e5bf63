"""Natural edits: rewrite a model's reply so that it satisfies one criterion, the way a person fixing
it by hand would, or give up.

An edit only rearranges, trims, recases or wraps the reply, or borrows whole sentences from the
model's other replies to the same prompt (``extra``): it never pads with a repeated filler or adds
stray markup. When no such edit exists (too few sentences to make three bullet points, no sentence
with the keyword) it returns None. Whether a reply really passes is always decided by the checker
afterwards, never assumed from the edit.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence

from criteriapo.criteria.library import Criterion, sentences, words

_MARKER = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
_DANGLING = {"a", "an", "and", "as", "at", "but", "by", "for", "in", "of", "or", "the", "to", "with", "is"}
CLOSERS = (
    "I hope this helps!",
    "Let me know if you would like to know more.",
    "Thanks for the question.",
    "There is always more to discover.",
)


def plain_sentences(text: str) -> list[str]:
    """The reply's sentences, list markers and line breaks removed; a sentence without an ending
    mark (a cut-off tail) is dropped."""
    lines = [_MARKER.sub("", line).strip() for line in text.splitlines()]
    flat = " ".join(line for line in lines if line)
    return [s for s in sentences(flat) if s[-1] in ".!?" and len(words(s)) >= 2]


def trim_cut_off(text: str) -> str | None:
    """A reply stopped by the token limit, cut back to its last complete sentence (None when it has
    none). Its own words, ended where a sentence ends."""
    keep = plain_sentences(text)
    return " ".join(keep) if keep else None


def _more_sentences(text: str, extra: Sequence[str], need: int) -> list[str] | None:
    """At least ``need`` sentences: the reply's own, then new ones from the other replies."""
    have = plain_sentences(text)
    seen = {s.lower() for s in have}
    for s in extra:
        if len(have) >= need:
            break
        if s.lower() not in seen:
            seen.add(s.lower())
            have.append(s)
    return have if len(have) >= need else None


def _first_words(text: str, n: int) -> str:
    """At most ``n`` words: whole sentences when the first fits, else the first sentence cut where
    no article or conjunction dangles, with a full stop."""
    kept: list[str] = []
    for s in plain_sentences(text) or [text]:
        if len(words(" ".join([*kept, s]))) > n:
            break
        kept.append(s)
    if kept:
        return " ".join(kept)
    cut = text.split()[:n]
    while len(cut) > 1 and cut[-1].lower().strip(",;:") in _DANGLING:
        cut.pop()
    return " ".join(cut).rstrip(",;:-") + "."


def _pick(options: Sequence[str], text: str) -> str:
    """A choice that depends on the text only, so the same reply always gets the same edit."""
    return options[int(hashlib.sha256(text.encode()).hexdigest(), 16) % len(options)]


def _strip_word(text: str, kw: str) -> str:
    out = re.sub(rf"(?<![A-Za-z0-9]){re.escape(kw)}(?![A-Za-z0-9])[,]?\s*", "", text, flags=re.IGNORECASE)
    return re.sub(r"[ \t]{2,}", " ", out).strip()


def _include(r: str, keywords: list[str], extra: Sequence[str]) -> str | None:
    """``r`` with, for each keyword it lacks, one of the model's other sentences that has it."""
    added = []
    for k in keywords:
        has = re.compile(rf"(?i)(?<![A-Za-z0-9]){re.escape(k)}(?![A-Za-z0-9])")
        if has.search(r):
            continue
        found = next((s for s in extra if has.search(s) and s not in added), None)
        if found is None:
            return None
        added.append(found)
    return " ".join([r, *added])


def satisfy(reply: str, c: Criterion, topic: str = "", extra: Sequence[str] = ()) -> str | None:
    """``reply`` edited to satisfy ``c``, or None when no natural edit does. ``topic`` names what
    the prompt is about (for a title); ``extra`` are sentences the model wrote in its other replies."""
    family, _, arg = c.name.partition(":")
    r = reply.strip()
    if not r:
        return None
    if family == "max_words":
        return _first_words(r, int(arg)) if len(words(r)) > int(arg) else r
    if family == "min_words":
        have = plain_sentences(r) or [r]
        for s in extra:
            if len(words(" ".join(have))) >= int(arg):
                break
            if s.lower() not in {h.lower() for h in have}:
                have.append(s)
        return " ".join(have) if len(words(" ".join(have))) >= int(arg) else None
    if family == "max_sentences":
        s = plain_sentences(r)
        return " ".join(s[: int(arg)]) if s else None
    if family in ("paragraphs", "bullets"):
        n = int(arg)
        s = _more_sentences(r, extra, n)
        if s is None:
            return None
        if family == "bullets":
            return "\n".join(f"- {x}" for x in s[:n])
        size = -(-len(s) // n)
        groups = [s[i : i + size] for i in range(0, len(s), size)]
        return "\n\n".join(" ".join(g) for g in groups) if len(groups) == n else None
    if family == "include":
        return _include(r, arg.split("|"), extra)
    if family == "avoid":
        for k in arg.split("|"):
            r = _strip_word(r, k)
        return r or None
    if family == "starts_with":
        if r.startswith(arg):
            return r
        return f"{arg}! {r}" if arg[-1].isalnum() else f"{arg} {r}"
    if family == "ends_with":
        return r if r.endswith(arg) else f"{r} {arg}"
    if family == "title":
        name = (topic or " ".join(words(r)[:3])).strip().title()
        return f"<<{name}>>\n\n{r}" if name else None
    if family == "postscript":
        ps = next((s for s in extra if s.lower() not in r.lower()), None) or _pick(CLOSERS, r)
        return f"{r}\n\nP.S. {ps}"
    return {
        "lowercase": lambda: r.lower(),
        "uppercase": lambda: r.upper(),
        "no_commas": lambda: re.sub(r",\s*", " ", r).replace(" ,", ""),
        "json": lambda: json.dumps({"answer": r}),
        "quoted": lambda: '"' + r.strip('"').replace('"', "'") + '"',
    }[family]()


# the order edits are applied in when a reply is fixed for several criteria: content first, then
# its layout, then its casing, then what wraps it
ORDER = [
    "avoid",
    "include",
    "min_words",
    "max_words",
    "max_sentences",
    "bullets",
    "paragraphs",
    "no_commas",
    "title",
    "postscript",
    "starts_with",
    "ends_with",
    "lowercase",
    "uppercase",
    "quoted",
    "json",
]


def satisfy_all(
    reply: str, criteria: Sequence[Criterion], topic: str = "", extra: Sequence[str] = ()
) -> str | None:
    """``reply`` edited for each of ``criteria`` in :data:`ORDER`; None when an edit gives up."""
    out: str | None = reply
    for c in sorted(criteria, key=lambda c: ORDER.index(c.name.partition(":")[0])):
        out = satisfy(out, c, topic, extra)
        if out is None:
            return None
    return out


def looping(text: str, pick: int) -> str | None:
    """The reply as a tuned model loops it: one of its list lines, or one of its sentences, said three
    times in a row where it stands (``pick`` chooses which). None when it has neither. A degradation,
    for rejected replies only."""
    lines = text.splitlines()
    listed = [i for i, line in enumerate(lines) if _MARKER.match(line) and len(words(line)) >= 2]
    if listed:
        i = listed[pick % len(listed)]
        return "\n".join([*lines[: i + 1], lines[i], lines[i], *lines[i + 1 :]])
    said = [s for s in sentences(text) if s[-1] in ".!?" and len(words(s)) >= 2 and s in text]
    if not said:
        return None
    s = said[pick % len(said)]
    at = text.index(s) + len(s)
    return f"{text[:at]} {s} {s}{text[at:]}"
