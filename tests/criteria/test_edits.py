"""Controlled edits do what they aim at, for every family, on a plain model-like reply."""

from __future__ import annotations

import pytest

from criteriapo.criteria import parse_criterion
from criteriapo.criteria.edits import break_, satisfy

REPLY = (
    "The sea is vast, deep and very old. Many creatures live in it. Sailors have crossed it for centuries."
)
SPECS = [
    "max_words:8",
    "min_words:40",
    "max_sentences:1",
    "paragraphs:2",
    "bullets:3",
    "include:salt|wind",
    "avoid:very",
    "starts_with:Sure.",
    "ends_with:Done.",
    "lowercase",
    "uppercase",
    "no_commas",
    "json",
    "title",
    "quoted",
    "postscript",
]


@pytest.mark.parametrize("spec", SPECS)
def test_satisfy_then_break(spec):
    c = parse_criterion(spec)
    good = satisfy(REPLY, c)
    assert c.passes(good), good
    assert not c.passes(break_(good, c)), break_(good, c)
    assert not c.passes(break_(REPLY, c))


def test_edits_cover_every_family():
    from criteriapo.criteria import FAMILIES

    assert {s.partition(":")[0] for s in SPECS} == set(FAMILIES)
