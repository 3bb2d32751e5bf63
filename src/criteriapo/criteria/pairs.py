"""Pair builders: the CriteriaPO recipes, from multi-criteria data to preference pairs.

- ``vanilla``: per prompt, the best against the worst response by overall score; ties dropped.
  In every recipe the chosen response is one a person would accept: a response that loops, is
  empty or was cut off (``"cut_off": true``) is never chosen (it may still be the rejected one).
- ``mini``: the vanilla pairs on which the criteria agree (none prefers the rejected response),
  with an overall margin of at least ``min_margin``, largest margins first, at most ``size``.
- ``finegrained``: per prompt and criterion, the best against the worst response on that
  criterion, tagged with it and weighted by ``weights[criterion]``; optionally the prompt is
  conditioned on the criterion so the trained model can be steered at inference.

A response's overall score is its ``overall`` field when given, else the mean of its ratings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from criteriapo.config import DPOConfig
from criteriapo.criteria.quality import AS_ASKED, AS_ASKED_DESCRIPTION, acceptable
from criteriapo.data.records import MultiCriteriaExample, PreferenceExample, RatedCompletion, Text
from criteriapo.errors import ConfigError

RECIPES = ("vanilla", "mini", "finegrained")


@dataclass(frozen=True)
class RecipeOptions:
    mini_size: int | None = None  # None: every agreeing pair
    mini_min_margin: float = DPOConfig.mini_min_margin  # one default, the config's
    weights: dict[str, float] = field(default_factory=dict)  # finegrained: per-criterion loss weight
    condition_on_criterion: bool = False
    descriptions: dict[str, str] = field(default_factory=dict)  # criterion -> instruction text


def overall(c: RatedCompletion) -> float | None:
    if c.overall is not None:
        return c.overall
    rated = [v for v in c.ratings.values() if v is not None]
    return sum(rated) / len(rated) if rated else None


def _extremes(scored: list[tuple[float, int]], ex: MultiCriteriaExample) -> tuple[int, int] | None:
    """Indices of the best and worst scores (first one on ties), or None when all are equal. The
    best is chosen among acceptable replies only (see :mod:`criteriapo.criteria.quality`): a reply
    that loops, is empty or was cut off by the token limit is never a chosen one, whatever its
    scores."""
    usable = [
        s for s in scored if not ex.completions[s[1]].cut_off and acceptable(ex.completions[s[1]].response)
    ]
    if len(scored) < 2 or not usable:
        return None
    best = max(usable, key=lambda s: (s[0], -s[1]))
    worst = min(scored, key=lambda s: (s[0], s[1]))
    return None if best[0] <= worst[0] else (best[1], worst[1])


def _labels(a: RatedCompletion, b: RatedCompletion) -> dict[str, int]:
    """Per-criterion verdicts for a (chosen) over b (rejected): +1, -1 or 0 where both are rated."""
    out = {}
    for k, va in a.ratings.items():
        vb = b.ratings.get(k)
        if va is not None and vb is not None:
            out[k] = (va > vb) - (va < vb)
    return out


def _pair(ex: MultiCriteriaExample, i: int, j: int, prompt: Text, **kw) -> PreferenceExample:
    chosen, rejected = ex.completions[i].response, ex.completions[j].response
    if isinstance(prompt, list):
        chosen, rejected = (
            [{"role": "assistant", "content": chosen}],
            [{"role": "assistant", "content": rejected}],
        )
    return PreferenceExample(prompt, chosen, rejected, ex.source, **kw)


def build_vanilla(examples: Iterable[MultiCriteriaExample]) -> list[PreferenceExample]:
    out = []
    for ex in examples:
        scored = [(s, i) for i, c in enumerate(ex.completions) if (s := overall(c)) is not None]
        if (ij := _extremes(scored, ex)) is None:
            continue
        i, j = ij
        out.append(_pair(ex, i, j, ex.prompt, criteria_labels=_labels(ex.completions[i], ex.completions[j])))
    return out


def build_mini(
    examples: Sequence[MultiCriteriaExample], size: int | None, min_margin: float
) -> list[PreferenceExample]:
    candidates = []
    for ex in examples:
        scored = [(s, i) for i, c in enumerate(ex.completions) if (s := overall(c)) is not None]
        if (ij := _extremes(scored, ex)) is None:
            continue
        i, j = ij
        labels = _labels(ex.completions[i], ex.completions[j])
        margin = overall(ex.completions[i]) - overall(ex.completions[j])
        if (
            margin >= min_margin
            and all(v >= 0 for v in labels.values())
            and any(v > 0 for v in labels.values())
        ):
            candidates.append((margin, len(candidates), _pair(ex, i, j, ex.prompt, criteria_labels=labels)))
    candidates.sort(key=lambda m: (-m[0], m[1]))
    return [p for _, _, p in candidates[:size]]


def condition_prompt(prompt: Text, instructions: Sequence[str]) -> Text:
    """Append instructions to the prompt (to its last user message when conversational)."""
    if not instructions:
        return prompt
    extra = " ".join(instructions)
    if isinstance(prompt, str):
        return f"{prompt}\n\n{extra}"
    out = [dict(m) for m in prompt]
    last = max(i for i, m in enumerate(out) if m["role"] == "user")
    out[last]["content"] = f"{out[last]['content']}\n\n{extra}"
    return out


def describe(criterion: str, descriptions: dict[str, str]) -> str:
    if criterion in descriptions:
        return descriptions[criterion]
    if criterion == AS_ASKED:
        return AS_ASKED_DESCRIPTION
    from criteriapo.criteria.library import parse_criterion

    try:
        return parse_criterion(criterion).description
    except ConfigError:
        return f"Above all, be good on {criterion.replace('_', ' ')}."


def build_finegrained(
    examples: Iterable[MultiCriteriaExample],
    weights: dict[str, float] | None = None,
    condition_on_criterion: bool = False,
    descriptions: dict[str, str] | None = None,
) -> list[PreferenceExample]:
    weights, descriptions = weights or {}, descriptions or {}
    out = []
    for ex in examples:
        for k in ex.criteria:
            scored = [(v, i) for i, c in enumerate(ex.completions) if (v := c.ratings.get(k)) is not None]
            if (ij := _extremes(scored, ex)) is None:
                continue
            prompt = (
                condition_prompt(ex.prompt, [describe(k, descriptions)])
                if condition_on_criterion
                else ex.prompt
            )
            out.append(_pair(ex, *ij, prompt, criterion=k, weight=weights.get(k, 1.0)))
    return out


def build_pairs(
    recipe: str, examples: Sequence[MultiCriteriaExample], opts: RecipeOptions
) -> list[PreferenceExample]:
    if recipe == "vanilla":
        return build_vanilla(examples)
    if recipe == "mini":
        return build_mini(examples, opts.mini_size, opts.mini_min_margin)
    if recipe == "finegrained":
        return build_finegrained(examples, opts.weights, opts.condition_on_criterion, opts.descriptions)
    raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
