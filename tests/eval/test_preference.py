"""Held-out preference: summed, per-token and reward accuracy, with numbers worked by hand."""

from __future__ import annotations

import pytest
import torch

from criteriapo.data.records import RowRef
from criteriapo.data.tokenize import TokenizedPair
from criteriapo.eval.preference import preference_eval
from criteriapo.train.scores import PairScores, SequenceScores


def scores(c, r, nc, nr) -> PairScores:
    return PairScores(
        SequenceScores(torch.tensor(c), torch.tensor(nc)), SequenceScores(torch.tensor(r), torch.tensor(nr))
    )


def test_three_views_of_one_set_of_scores():
    pairs = [TokenizedPair([1], [2], [3], RowRef("t", i)) for i in range(2)]
    # pair 0: chosen -10 over 10 tokens (-1/token), rejected -4 over 2 (-2/token): summed says
    # rejected, per token says chosen. pair 1: chosen -3 (3 tokens), rejected -5 (5): summed chosen,
    # per token a tie (not counted as correct)
    policy = scores([-10.0, -3.0], [-4.0, -5.0], [10, 3], [2, 5])
    reference = scores([-12.0, -3.0], [-4.0, -4.0], [10, 3], [2, 5])
    e = preference_eval(policy, pairs, reference, beta=0.5)
    assert e.accuracy == 0.5 and e.normalized_accuracy == 0.5
    assert e.margin == pytest.approx(((-10 + 4) + (-3 + 5)) / 2)
    # rewards: pair 0: 0.5 * ((-10 - -12) - (-4 - -4)) = 1; pair 1: 0.5 * ((0) - (-5 - -4)) = 0.5
    assert e.reward_accuracy == 1.0 and e.reward_margin == pytest.approx(0.75)
    itself = preference_eval(reference, pairs, reference)
    assert itself.reward_accuracy == 0.0 and itself.reward_margin == 0.0
    assert preference_eval(policy, pairs).reward_accuracy is None


def test_per_criterion_both_views_by_hand():
    """Tagged pairs: summed accuracy and reward accuracy per criterion; no reference, no rewards."""
    tags = ["lowercase", "lowercase", "title"]
    pairs = [TokenizedPair([1], [2], [3], RowRef("t", i), criterion=c) for i, c in enumerate(tags)]
    policy = scores([-10.0, -3.0, -6.0], [-4.0, -5.0, -5.0], [1, 1, 1], [1, 1, 1])
    reference = scores([-12.0, -2.0, -9.0], [-4.0, -5.0, -5.0], [1, 1, 1], [1, 1, 1])
    e = preference_eval(policy, pairs, reference)
    # summed: pair 0 no (-10 < -4), 1 yes, 2 no; rewards: pair 0 +2, 1 -1, 2 +3
    assert e.by_criterion == {"lowercase": 0.5, "title": 0.0}
    assert e.reward_by_criterion == {"lowercase": 0.5, "title": 1.0}
    assert preference_eval(policy, pairs).reward_by_criterion == {}
