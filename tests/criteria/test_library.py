"""Every verifiable criterion, with its edge cases."""

from __future__ import annotations

import pytest

from criteriapo.criteria import FAMILIES, parse_criteria, parse_criterion
from criteriapo.errors import ConfigError

CASES = [
    # (spec, response, passes)
    ("max_words:3", "One two three.", True),
    ("max_words:3", "One two three four.", False),
    ("max_words:2", "It's well-known.", True),  # contractions and hyphenated words count once
    ("min_words:3", "One, two, three!", True),
    ("min_words:3", "One two", False),
    ("max_sentences:1", "Paris is the capital.", True),
    ("max_sentences:1", "Paris. It is big.", False),
    ("max_sentences:2", "Dr Smith arrived. Hi!", True),
    ("max_sentences:1", "Version 2.5 is out", True),  # a dot inside a number ends no sentence
    ("paragraphs:2", "First part.\n\nSecond part.", True),
    ("paragraphs:2", "First part.\nStill first.", False),
    ("paragraphs:2", "A.\n   \nB.\n\n\n", True),  # blank lines with spaces still separate
    ("bullets:2", "- one\n- two", True),
    ("bullets:2", "* one\n• two\nnot a bullet", True),
    ("bullets:2", "- one\n- two\n- three", False),
    ("bullets:1", "-not a bullet", False),
    ("include:apple|pear", "I like apples and a pear.", False),  # "apples" is not "apple"
    ("include:apple|pear", "An Apple and a PEAR.", True),  # case does not matter
    ("avoid:very", "Everything is fine.", True),  # "very" inside "Everything" does not count
    ("avoid:very", "It is very fine.", False),
    ("starts_with:Answer:", "  Answer: 4", True),
    ("starts_with:Answer:", "The Answer: 4", False),
    ("ends_with:Done.", "All good. Done.\n", True),
    ("ends_with:Done.", "Done. All good.", False),
    ("lowercase", "all lower, 123.", True),
    ("lowercase", "Not lower.", False),
    ("lowercase", "123 !", False),  # no letters: not a reply in lowercase
    ("uppercase", "PARIS IS THE CAPITAL.", True),
    ("uppercase", "PARIS is", False),
    ("no_commas", "No commas here.", True),
    ("no_commas", "One, two.", False),
    ("json", '{"answer": "Paris"}', True),
    ("json", '```json\n{"answer": 4}\n```', True),
    ("json", "{'answer': 'Paris'}", False),
    ("json", "Paris", False),
    ("title", "<<A Poem>>\nRoses are red.", True),
    ("title", "<A Poem>\nRoses.", False),
    ("title", "<<>> empty", False),
    ("quoted", '"Paris is the capital."', True),
    ("quoted", '"Paris" is the capital.', False),
    ("quoted", '"', False),
    ("postscript", "Hello.\nP.S. Bring snacks.", True),
    ("postscript", "Hello. PS bring snacks.", False),
]


@pytest.mark.parametrize("spec, response, passes", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker(spec, response, passes):
    assert parse_criterion(spec).passes(response) is passes


@pytest.mark.parametrize("spec", ["max_words:5", "min_words:1", "lowercase", "avoid:x", "no_commas", "json"])
def test_empty_reply_fails_everything(spec):
    assert parse_criterion(spec).passes("   \n") is False


def test_every_family_has_cases_and_a_description():
    tested = {c[0].partition(":")[0] for c in CASES}
    assert tested == set(FAMILIES)
    for spec in ("max_words:7", "bullets:1", "include:cat", "starts_with:Hi", "lowercase", "title"):
        c = parse_criterion(spec)
        assert c.name == spec and c.description.endswith(".") and c.verifiable


def test_parse_list_and_round_trip():
    cs = parse_criteria("max_words:20; no_commas;include:apple|pear")
    assert [c.name for c in cs] == ["max_words:20", "no_commas", "include:apple|pear"]
    assert [parse_criterion(c.name).name for c in cs] == [c.name for c in cs]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("max_words", "max_words needs a value, e.g. max_words:3"),
        ("max_words:many", "max_words needs a whole number"),
        ("bullets:0", "bullets needs a number >= 1, got 0"),
        ("lowercase:yes", "lowercase takes no value"),
        ("include:", "needs at least one keyword"),
        ("rhymes", "unknown criterion 'rhymes'; families: avoid, bullets"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_criterion(spec)
