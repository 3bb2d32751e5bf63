"""Controlled edits: rewrite a response so that it satisfies, or breaks, one criterion.

Edits are simple and deterministic. They aim at one criterion; whether a response really passes is
always decided by the checker afterwards, never assumed from the edit.
"""

from __future__ import annotations

import json
import re

from criteriapo.criteria.library import Criterion, sentences, words

FILLER = "This point deserves a closer look and there is more to say about it."


def _strip_words(text: str, kw: str) -> str:
    return re.sub(rf"(?<![A-Za-z0-9]){re.escape(kw)}(?![A-Za-z0-9])", "", text, flags=re.IGNORECASE)


def _first_words(text: str, n: int) -> str:
    return " ".join(text.split()[:n]).rstrip(",;:") + "."


def satisfy(response: str, c: Criterion) -> str:
    family, _, arg = c.name.partition(":")
    r = response.strip()
    if family == "max_words":
        return _first_words(r, int(arg)) if len(words(r)) > int(arg) else r
    if family == "min_words":
        while len(words(r)) < int(arg):
            r = f"{r} {FILLER}"
        return r
    if family == "max_sentences":
        return " ".join(sentences(r)[: int(arg)]) or r
    if family == "paragraphs":
        s = sentences(r) or [r]
        n = int(arg)
        while len(s) < n:
            s.append(FILLER)
        size = -(-len(s) // n)
        return "\n\n".join(" ".join(s[i : i + size]) for i in range(0, len(s), size))
    if family == "bullets":
        s = sentences(r) or [r]
        n = int(arg)
        while len(s) < n:
            s.append(FILLER)
        return "\n".join(f"- {x}" for x in s[: n - 1] + [" ".join(s[n - 1 :])])
    if family == "include":
        return r + " " + " ".join(f"({k})" for k in arg.split("|"))
    if family == "avoid":
        for k in arg.split("|"):
            r = _strip_words(r, k)
        return re.sub(r"\s{2,}", " ", r).strip()
    if family == "starts_with":
        return r if r.startswith(arg) else f"{arg} {r}"
    if family == "ends_with":
        return r if r.endswith(arg) else f"{r} {arg}"
    return {
        "lowercase": lambda: r.lower(),
        "uppercase": lambda: r.upper(),
        "no_commas": lambda: r.replace(",", ""),
        "json": lambda: json.dumps({"answer": r}),
        "title": lambda: f"<<{' '.join(words(r)[:3]).title() or 'Reply'}>>\n{r}",
        "quoted": lambda: f'"{r.strip(chr(34))}"',
        "postscript": lambda: f"{r}\n\nP.S. Thanks for asking.",
    }[family]()


def break_(response: str, c: Criterion) -> str:
    family, _, arg = c.name.partition(":")
    r = response.strip()
    if family == "max_words":
        while len(words(r)) <= int(arg):
            r = f"{r} {FILLER}"
        return r
    if family == "min_words":
        return _first_words(r, max(1, int(arg) // 2))
    if family in ("max_sentences", "paragraphs"):
        flat = " ".join(r.split())
        return f"{flat} {FILLER} {FILLER} {FILLER}" if family == "max_sentences" else flat
    if family == "bullets":
        return " ".join(re.sub(r"^\s*[-*•]\s+", "", line) for line in r.splitlines())
    if family == "include":
        for k in arg.split("|"):
            r = _strip_words(r, k)
        return re.sub(r"\s{2,}", " ", r).strip()
    if family == "avoid":
        return f"{r} ({arg.split('|')[0]})"
    if family == "starts_with":
        return r[len(arg) :].lstrip() if r.startswith(arg) else r
    if family == "ends_with":
        return r[: -len(arg)].rstrip() if r.endswith(arg) else r
    return {
        "lowercase": lambda: r[:1].upper() + r[1:] if r[:1].isalpha() else f"Well, {r}",
        "uppercase": lambda: r.lower(),
        "no_commas": lambda: f"Well, {r}" if "," not in r else r,
        "json": lambda: r if not r.startswith(("{", "[", '"')) else f"Answer: {r}",
        "title": lambda: re.sub(r"<<[^<>\n]+>>\s*", "", r),
        "quoted": lambda: r.strip('"'),
        "postscript": lambda: re.sub(r"(?m)^\s*P\.S\..*$", "", r).strip(),
    }[family]()
