"""The one description of how a reply is generated, shared by the CLI, evaluation, the data maker
and anything long-running that generates between its own work."""

from __future__ import annotations

import math
from dataclasses import dataclass

from criteriapo.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature`` is 0; else drawn from the ``top_k`` most likely tokens (0: all),
    then the nucleus of mass ``top_p``, by a random generator seeded with ``seed`` for this call only.
    A reply ends at the model's end of turn, at ``max_new_tokens``, or before the first of the
    ``stop`` strings (which is not part of the reply)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 50  # transformers' default
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str | list):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        problems = []
        if not _whole(self.max_new_tokens) or self.max_new_tokens < 1:
            problems.append(
                f"max_new_tokens must be a whole number of at least 1, not {self.max_new_tokens!r}"
            )
        if not _number(self.temperature) or self.temperature < 0:
            problems.append(
                f"temperature must be a number of at least 0 (0: greedy), not {self.temperature!r}"
            )
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be a number in (0, 1], not {self.top_p!r}")
        if not _whole(self.top_k) or self.top_k < 0:
            problems.append(f"top_k must be a whole number of at least 0 (0: no limit), not {self.top_k!r}")
        if not _whole(self.seed):
            problems.append(f"seed must be a whole number, not {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            problems.append(f"stop must be non-empty strings, not {list(self.stop)!r}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and not math.isnan(x)


def _whole(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


GREEDY = Sampling()  # the default: greedy, up to 128 new tokens
