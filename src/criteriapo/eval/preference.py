"""Held-out preference of one model: does it rank the chosen reply above the rejected one?

Three views, because each alone misleads:

- ``accuracy``: the chosen completion has the higher log-probability summed over its tokens. A
  property of the model alone (base, SFT and DPO compare on one scale), but it favours the shorter
  reply, so on data whose chosen replies are longer it can sit below chance while the model learns.
- ``normalized_accuracy``: the same with log-probabilities averaged per token.
- ``reward_accuracy`` and ``reward_margin`` (TRL's ``eval_rewards/accuracies`` and ``margins``):
  against a reference, the implicit reward beta * (log p - log p_ref) of the chosen completion is
  higher. What DPO optimises, and what a DPO user reads as "did it learn my preferences"; 0 for the
  reference itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from criteriapo.data.tokenize import TokenizedPair
from criteriapo.train.scores import PairScores


@dataclass
class PreferenceEval:
    accuracy: float
    margin: float
    pairs: int
    by_criterion: dict[str, float] = field(default_factory=dict)  # accuracy per criterion tag
    normalized_accuracy: float = float("nan")
    reward_accuracy: float | None = None  # None: no reference to compare with
    reward_margin: float | None = None
    reward_by_criterion: dict[str, float] = field(default_factory=dict)  # reward accuracy per criterion tag

    def as_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "normalized_accuracy": self.normalized_accuracy,
            "margin": self.margin,
            "reward_accuracy": self.reward_accuracy,
            "reward_margin": self.reward_margin,
            "pairs": self.pairs,
            "by_criterion": self.by_criterion,
            "reward_by_criterion": self.reward_by_criterion,
        }


def preference_eval(
    scores: PairScores,
    pairs: Sequence[TokenizedPair],
    reference: PairScores | None = None,
    beta: float = 0.1,
) -> PreferenceEval:
    diff = scores.margins  # (N,)
    correct = (diff > 0).float()
    per_token = scores.chosen.per_token - scores.rejected.per_token
    by = _by_criterion(pairs, correct.tolist())
    reward_acc = reward_margin = None
    reward_by: dict[str, float] = {}
    if reference is not None:
        rewards = beta * (diff - reference.margins)  # chosen minus rejected reward
        reward_acc, reward_margin = float((rewards > 0).float().mean()), float(rewards.mean())
        reward_by = _by_criterion(pairs, (rewards > 0).float().tolist())
    return PreferenceEval(
        float(correct.mean()),
        float(diff.mean()),
        len(pairs),
        by,
        float((per_token > 0).float().mean()),
        reward_acc,
        reward_margin,
        reward_by,
    )


def _by_criterion(pairs: Sequence[TokenizedPair], correct: list[float]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for p, c in zip(pairs, correct, strict=True):
        if p.criterion is not None:
            groups.setdefault(p.criterion, []).append(c)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}
