"""The sampling step: one token per row, drawn from a generator of the call's own."""

from __future__ import annotations

from typing import Any


class Sampler:
    """Temperature, top-k, top-p, then one token per row drawn by the exponential race: the argmax
    of p_i / E_i with E_i ~ Exp(1) is distributed as the categorical p. It returns logits whose only
    finite entry is the drawn token, so greedy decoding emits it. The draw is the one transformers'
    sampling makes (temperature, then top-k, then top-p: a token is dropped when the more likely
    ones already hold ``top_p`` of the mass), but over the k kept tokens only: ``torch.multinomial``
    and the top-p sort over the whole vocabulary took a third of the sampling time on CPU."""

    def __init__(self, temperature: float, top_k: int, top_p: float, generator: Any):
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        logits = scores.float() / self.temperature
        k = min(self.top_k, logits.shape[-1]) if self.top_k else logits.shape[-1]
        top, index = logits.topk(k, dim=-1)  # (B, k), most likely first
        probs = top.softmax(-1)
        if self.top_p < 1.0:
            before = probs.cumsum(-1) - probs  # mass of the more likely tokens
            probs = probs.masked_fill(before >= self.top_p, 0.0)  # the most likely one always stays
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        drawn = index.gather(-1, (probs / race).argmax(-1, keepdim=True))  # (B, 1)
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

        rows = zip(scores, self.settings, self.generators, strict=True)
        index = torch.tensor([[draw(row, s, g)] for row, s, g in rows], device=scores.device)
        return torch.full_like(scores, float("-inf")).scatter_(-1, index, 0.0)


def draw(scores: Any, sampling: Any, generator: Any) -> int:
    """One row's next token from its logits ``scores`` (V,): the most likely when ``generator`` is
    None (greedy), else drawn by :class:`Sampler` with ``sampling``'s settings."""
    if generator is None:
        return int(scores.argmax())
    s = sampling
    return int(Sampler(s.temperature, s.top_k, s.top_p, generator)(None, scores[None]).argmax())
