"""Held-out preference accuracy of one model, with no reference needed.

A pair counts as correct when the model gives the chosen completion a higher log-probability
(summed over its tokens) than the rejected one. The margin is the mean of that difference. Both
are properties of the model alone, so base, SFT and DPO models compare on one scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from criteriapo.data.tokenize import TokenizedPair
from criteriapo.train.tasks import PairScores


@dataclass
class PreferenceEval:
    accuracy: float
    margin: float
    pairs: int
    by_criterion: dict[str, float] = field(default_factory=dict)  # accuracy per criterion tag

    def as_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "margin": self.margin,
            "pairs": self.pairs,
            "by_criterion": self.by_criterion,
        }


def preference_eval(scores: PairScores, pairs: Sequence[TokenizedPair]) -> PreferenceEval:
    diff = scores.chosen - scores.rejected  # (N,)
    correct = (diff > 0).float()
    groups: dict[str, list[float]] = {}
    for p, c in zip(pairs, correct.tolist(), strict=True):
        if p.criterion is not None:
            groups.setdefault(p.criterion, []).append(c)
    by = {k: sum(v) / len(v) for k, v in sorted(groups.items())}
    return PreferenceEval(float(correct.mean()), float(diff.mean()), len(pairs), by)
