"""Quality guards: what loops, what does not, and what is cut off."""

from __future__ import annotations

import pytest

from criteriapo.criteria.quality import acceptable, quality_summary, repeated_span, reply_quality

LOOPS = [
    (
        "The sea is a vast, unforgiving, and unforgiving, unforgiving, unforgiving, unforgiving",
        "unforgiving ,",
    ),
    ('"TED-TED-TED-TED-TED-TED-TED-TED-TED-TED-', "ted -"),
    ("A: A: A: A: A: A: A: A:", "a :"),
    ("Owls hunt at night. Owls hunt at night. Owls hunt at night.", "owls hunt at night ."),
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
    ]
    assert [x.ok for x in q] == [True, False, False, False]
    assert q[1].problems() == ["empty"] and q[3].problems() == ["cut off by the token limit"]
    assert not acceptable("") and acceptable("It was a long")
    s = quality_summary(q)
    assert s == {"repetition_rate": 0.25, "empty_rate": 0.25, "cut_off_rate": 0.25, "mean_words": 2.5}
