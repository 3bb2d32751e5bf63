"""The sampling step: one token per row, drawn from a generator of the call's own (:class:`Sampler`)
or of the row's own (:func:`draw_rows`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def kept(scores: Any, temperature: float, top_k: int, top_p: float) -> tuple[Any, Any]:
    """The tokens that temperature, top-k and top-p leave to draw from: logits ``scores`` (B, V) ->
    their probabilities (B, k), most likely first, a token dropped by top-p at 0, and their ids (B, k).
    As transformers' sampling cuts (temperature, then top-k, then top-p: a token is dropped when the
    more likely ones already hold ``top_p`` of the mass), but over the k kept tokens only."""
    logits = scores.float() / temperature
    k = min(top_k, logits.shape[-1]) if top_k else logits.shape[-1]
    top, index = logits.topk(k, dim=-1)  # (B, k), most likely first
    probs = top.softmax(-1)
    if top_p < 1.0:
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        probs = probs.masked_fill(before >= top_p, 0.0)  # the most likely one always stays
    return probs, index


def raced(probs: Any, index: Any, race: Any) -> Any:
    """The exponential race: the argmax of p_i / E_i with E_i ~ Exp(1) (``race``, (B, k)) is
    distributed as the categorical p. (B, k) -> the drawn ids (B, 1)."""
    return index.gather(-1, (probs / race).argmax(-1, keepdim=True))


class Sampler:
    """Temperature, top-k, top-p (:func:`kept`), then one token per row drawn by the exponential race
    (:func:`raced`) with one generator for the batch. It returns logits whose only finite entry is
    the drawn token, so greedy decoding emits it. ``torch.multinomial`` and the top-p sort over the
    whole vocabulary took a third of the sampling time on CPU."""

    def __init__(self, temperature: float, top_k: int, top_p: float, generator: Any):
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        probs, index = kept(scores, self.temperature, self.top_k, self.top_p)
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        drawn = raced(probs, index, race)  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter_(-1, drawn, 0.0)


class RowSampler:
    """Each row's own sampling settings and random generator (seeded with its own seed), for a
    batch whose replies were asked for separately: a row draws the same tokens whatever rows share
    its batch (up to the numerics of the batch). A greedy row takes its most likely token."""

    def __init__(self, settings: list[Any], device: Any):
        import torch

        self.settings = settings
        self.generators = [
            None if s.greedy else torch.Generator(device).manual_seed(s.seed) for s in settings
        ]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        index = draw_rows(scores, self.settings, self.generators)[:, None]  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter_(-1, index, 0.0)


def draw_rows(scores: Any, settings: Sequence[Any], generators: Sequence[Any]) -> Any:
    """Each row's next token from its logits ``scores`` (B, V) -> (B,): the most likely where its
    generator is None (greedy), else drawn as :class:`Sampler` draws with the row's ``settings``
    (a :class:`~criteriapo.generation.options.Sampling`) and its own generator. Rows with the same
    temperature, top-k and top-p are cut together and race together; only the k exponentials of
    each row come from that row's generator, so a row draws the same token whatever rows share the
    batch, and the same as a :class:`Sampler` of its own would."""
    import torch

    tokens = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    greedy = [i for i, g in enumerate(generators) if g is None]
    if greedy:
        tokens[greedy] = _rows(scores, greedy).argmax(-1)
    groups: dict[tuple[float, int, float], list[int]] = {}
    for i, (s, g) in enumerate(zip(settings, generators, strict=True)):
        if g is not None:
            groups.setdefault((s.temperature, s.top_k, s.top_p), []).append(i)
    for (temperature, top_k, top_p), rows in groups.items():
        probs, index = kept(_rows(scores, rows), temperature, top_k, top_p)  # (n, k)
        race = torch.empty_like(probs)
        for row, i in zip(race, rows, strict=True):
            row.exponential_(generator=generators[i])
        tokens[rows] = raced(probs, index, race)[:, 0]
    return tokens


def _rows(scores: Any, rows: list[int]) -> Any:
    """The rows ``rows`` of ``scores``, copied only when they are not all of them."""
    return scores if len(rows) == scores.shape[0] else scores[rows]
