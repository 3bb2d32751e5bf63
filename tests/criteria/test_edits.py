"""Natural edits: each makes a model-like reply pass its criterion without padding or stray markup,
and gives up (None) when only an unnatural edit would do."""

from __future__ import annotations

import pytest

from criteriapo.criteria import parse_criterion
from criteriapo.criteria.edits import (
    CLOSERS,
    ORDER,
    looping,
    plain_sentences,
    satisfy,
    satisfy_all,
    trim_cut_off,
)
from criteriapo.criteria.library import words
from criteriapo.criteria.quality import acceptable, repeated_span

REPLY = (
    "The sea is vast, deep and very old. Many creatures live in it. Sailors have crossed it for centuries."
)
OTHERS = [
    "Waves carry salt spray onto the shore.",
    "The wind shapes the waves every day.",
    "Tides rise and fall twice a day.",
    "Whales sing to each other across great distances.",
]
SPECS = [
    "max_words:8",
    "min_words:40",
    "max_sentences:1",
    "paragraphs:2",
    "bullets:3",
    "include:salt|wind",
    "avoid:very",
    "starts_with:Sure",
    "ends_with:Done",
    "lowercase",
    "uppercase",
    "no_commas",
    "json",
    "title",
    "quoted",
    "postscript",
]


def _vocabulary(*texts: str) -> set[str]:
    return {w.lower() for t in texts for w in words(t)}


@pytest.mark.parametrize("spec", SPECS)
def test_satisfy_passes_and_reads_naturally(spec):
    """The edited reply passes, does not loop, says no sentence twice, and adds no word but the
    model's own (this reply's and its other replies'), the topic, what the criterion names, and the
    wrappers a person would write (a JSON key, "P.S.", a closing line)."""
    c = parse_criterion(spec)
    good = satisfy(REPLY, c, "the sea", OTHERS)
    assert good is not None and c.passes(good), good
    assert acceptable(good), good
    sents = plain_sentences(good)
    assert len(sents) == len(set(sents)), good
    allowed = _vocabulary(REPLY, *OTHERS, "the sea", spec.partition(":")[2], "answer P.S.", *CLOSERS)
    assert _vocabulary(good) <= allowed, _vocabulary(good) - allowed


def test_edits_cover_every_family():
    from criteriapo.criteria import FAMILIES

    assert {s.partition(":")[0] for s in SPECS} == set(FAMILIES) == set(ORDER)


@pytest.mark.parametrize(
    ("spec", "others"),
    [
        ("min_words:200", OTHERS),  # not enough of the model's own sentences
        ("bullets:3", []),  # a one-sentence reply cannot be three bullet points
        ("include:lighthouse", OTHERS),  # no sentence the model wrote has the word
    ],
)
def test_no_natural_edit_gives_up(spec, others):
    reply = REPLY if spec != "bullets:3" else "The sea is vast."
    assert satisfy(reply, parse_criterion(spec), "the sea", others) is None


def test_no_filler_no_repetition():
    """Lengthening borrows distinct sentences; it never repeats one (the old filler did)."""
    out = satisfy(REPLY, parse_criterion("min_words:35"), "the sea", OTHERS + OTHERS)
    sents = plain_sentences(out)
    assert len(sents) == len(set(sents))


def test_word_limit_keeps_whole_sentences_or_cuts_cleanly():
    assert satisfy(REPLY, parse_criterion("max_words:15"), "", []) == (
        "The sea is vast, deep and very old. Many creatures live in it."
    )
    cut = satisfy("The sea is vast and deep and old and full of life.", parse_criterion("max_words:5"))
    assert cut == "The sea is vast."  # "and" does not dangle at the end


def test_satisfy_all_chains_and_title_names_the_topic():
    cs = [parse_criterion(s) for s in ("title", "lowercase", "max_sentences:1")]
    out = satisfy_all(REPLY, cs, "honey bees")
    assert out == "<<honey bees>>\n\nthe sea is vast, deep and very old."
    assert all(c.passes(out) for c in cs)
    assert satisfy_all("Short.", [parse_criterion("bullets:3")]) is None


def test_cut_off_reply_is_trimmed_to_its_last_sentence():
    assert trim_cut_off("Owls hunt at night. They see well in the dark. Their feathers are so") == (
        "Owls hunt at night. They see well in the dark."
    )
    assert trim_cut_off("Owls hunt at night and") is None


def test_looping_says_one_sentence_or_list_line_three_times_where_it_stands():
    text = "Owls hunt at night. They see well in the dark. Their hearing is sharp."
    looped = looping(text, 1)
    assert looped == (
        "Owls hunt at night. They see well in the dark. They see well in the dark. "
        "They see well in the dark. Their hearing is sharp."
    )
    assert repeated_span(looped) is not None and repeated_span(text) is None
    listed = "Tea facts:\n- It is old.\n- It grows on bushes."
    assert looping(listed, 0) == "Tea facts:\n- It is old.\n- It is old.\n- It is old.\n- It grows on bushes."
    assert repeated_span(looping(listed, 0)) is not None
    assert looping("ok", 0) is None and looping("no ending mark here", 3) is None
