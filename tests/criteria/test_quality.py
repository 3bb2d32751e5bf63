"""Quality guards: what loops, what does not, and what is cut off."""

from __future__ import annotations

import pytest

from criteriapo.criteria.quality import (
    acceptable,
    quality_summary,
    repeated_span,
    reply_quality,
    unasked_format,
)

LOOPS = [
    (
        "The sea is a vast, unforgiving, and unforgiving, unforgiving, unforgiving, unforgiving",
        "unforgiving ,",
    ),
    ('"TED-TED-TED-TED-TED-TED-TED-TED-TED-TED-', "ted -"),
    ("A: A: A: A: A: A: A: A:", "a :"),
    ("Owls hunt at night. Owls hunt at night. Owls hunt at night.", "owls hunt at night ."),
    # two identical bullets and a third begun like them (the main job's one loop after DPO)
    (
        "- It's made from soap.\n- It's made from soap.\n- It's a special kind of soap.",
        "- it ' s made from soap .",
    ),
    ("the the the the cat", "the"),
    ("Code: `x`. Then: yes yes yes yes", "yes"),  # prose around code is still checked
]
FINE = [
    "Paris is the capital of France.",
    "It was very, very good.",
    "No, no, no: that is not how it works.",
    "- Owls hunt at night.\n- Owls see well.\n- Owls fly silently.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    "Ha ha ha!",
    "",
    "| a | b |\n|---|---|\n| yes | yes |",
    "| yes | yes | yes | yes | yes |",
    "#### Step 1\n----\nWell.... Great job!!!! 🎉🎉🎉🎉",
    "Ping 0.0.0.0 and [0, 0, 0, 0] with VALUES (?, ?, ?, ?).",
    "Use `std::vector<std::vector<std::vector<int>>>` here.",
    "```python\nprint(f(g(h(k(1)))))\nx = x = x = x = x\n```",
    "# ============",
]


@pytest.mark.parametrize("text, span", LOOPS)
def test_degenerate_repetition_is_found(text, span):
    assert repeated_span(text) == span
    assert not acceptable(text)


@pytest.mark.parametrize("text", FINE)
def test_ordinary_text_does_not_loop(text):
    assert repeated_span(text) is None


def test_quality_and_summary():
    q = [
        reply_quality("Paris."),
        reply_quality("   "),
        reply_quality("A: A: A: A: A:"),
        reply_quality("It was a long", cut_off=True),
        reply_quality("<<Owls>>\n\nOwls hunt.", asked=["lowercase"]),
    ]
    assert [x.ok for x in q] == [True, False, False, False, False]
    assert q[1].problems() == ["empty"] and q[3].problems() == ["cut off by the token limit"]
    assert q[4].problems() == ["unasked title"]
    assert not acceptable("") and acceptable("It was a long")
    s = quality_summary(q)
    assert s == {
        "repetition_rate": 0.2,
        "empty_rate": 0.2,
        "cut_off_rate": 0.2,
        "unasked_format_rate": 0.2,
        "mean_words": 2.6,
    }


@pytest.mark.parametrize(
    ("text", "asked", "found"),
    [
        ("<<Owls>>\n\nOwls hunt at night.", [], ["title"]),
        ("<<Owls>>\n\nOwls hunt at night.", ["title"], []),
        ('"Owls hunt at night."', ["max_words:20"], ["quoted"]),
        ('{"answer": "Owls hunt."}', [], ["json"]),
        ("Owls hunt.\n\nP.S. They are quiet.", ["no_commas"], ["postscript"]),
        ("OWLS HUNT AT NIGHT.", [], ["uppercase"]),
        ("OK. Yes.", [], []),  # two capitalised words are not shouting
        ('Owls hunt at night, as the book says: "silently".', [], []),
        ("", [], []),
    ],
)
def test_unasked_format(text, asked, found):
    assert unasked_format(text, asked) == found
