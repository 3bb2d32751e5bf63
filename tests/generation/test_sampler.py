"""Drawing every row's token at once gives each row the token its own sampler draws alone."""

from __future__ import annotations

from criteriapo.generation import Sampling
from criteriapo.generation.sampler import Sampler, draw_rows

ROWS = [
    Sampling(),  # greedy
    Sampling(temperature=1.0, top_k=50, top_p=0.95, seed=1),
    Sampling(temperature=1.0, top_k=50, top_p=0.95, seed=2),  # the same settings: drawn together
    Sampling(temperature=0.7, top_k=8, top_p=0.8, seed=3),
    Sampling(temperature=1.3, top_k=0, top_p=1.0, seed=4),  # the whole vocabulary
    Sampling(),
]


def _generators(settings):
    import torch

    return [None if s.greedy else torch.Generator().manual_seed(s.seed) for s in settings]


def test_rows_drawn_together_draw_what_each_draws_alone_with_its_own_generator():
    """Step after step, the vectorized draw (rows grouped by settings, each racing with its own
    generator) gives each row the token of the per-row draw it replaces (a Sampler of its own, or
    the argmax), and a row's tokens do not depend on which rows share its batch."""
    import torch

    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(len(ROWS), 300, generator=g) * 2.5 for _ in range(30)]
    together, alone, subset = _generators(ROWS), _generators(ROWS), _generators(ROWS[1:5:2])
    drawn, expected, drawn_subset = [], [], []
    for logits in steps:
        drawn.append(draw_rows(logits, ROWS, together).tolist())
        expected.append(
            [
                int(row.argmax())
                if s.greedy
                else int(Sampler(s.temperature, s.top_k, s.top_p, gen)(None, row[None]).argmax())
                for row, s, gen in zip(logits, ROWS, alone, strict=True)
            ]
        )
        drawn_subset.append(draw_rows(logits[1:5:2], ROWS[1:5:2], subset).tolist())
    assert drawn == expected
    assert drawn_subset == [[row[1], row[3]] for row in drawn]
    argmax = [logits.argmax(-1).tolist() for logits in steps]
    assert all(sum(d[i] != a[i] for d, a in zip(drawn, argmax, strict=True)) >= 5 for i in (1, 2, 4))
