"""Seeded data order with a resumable position, optionally grouped by length, keeping units of
examples (a prompt's pairs) together."""

from __future__ import annotations

from collections.abc import Sequence

import torch

GROUP_WINDOW = 64  # batches sorted together when grouping by length


class DataOrder:
    """A fresh seeded permutation each epoch; ``state_dict`` records where the next batch starts.

    With ``units`` (lists of example indices covering every example once), a unit's examples are
    consecutive in every epoch's order, so they share a batch unless they straddle two: the
    permutation shuffles units, not examples. Without, each example is a unit of its own.

    With ``lengths``, batches hold examples of similar length: each window of 64 batches of the
    permutation is sorted by length (a unit by its longest example, staying together), cut into
    batches, and those batches are shuffled (an epoch's short last batch stays last). The order is a
    function of the seed and epoch, so it resumes exactly."""

    def __init__(
        self,
        size: int,
        seed: int,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
        units: Sequence[Sequence[int]] | None = None,
    ):
        if size < 1:
            raise ValueError("no training examples")
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"{len(lengths)} lengths for {size} examples")
        units = [list(u) for u in units] if units is not None else [[i] for i in range(size)]
        if sorted(i for u in units for i in u) != list(range(size)):
            raise ValueError(f"units must hold each of the {size} examples once")
        self.size, self.seed = size, seed
        self.lengths, self.batch_size, self.units = lengths, batch_size, units
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.units), generator=g).tolist()
        perm = [i for u in order for i in self.units[u]]
        if self.lengths is None:
            return perm
        unit_of = {i: r for r, u in enumerate(order) for i in self.units[u]}
        longest = {r: max(self.lengths[i] for i in self.units[u]) for r, u in enumerate(order)}
        bs = self.batch_size
        batches = []
        for start in range(0, self.size, GROUP_WINDOW * bs):
            window = perm[start : start + GROUP_WINDOW * bs]
            window.sort(key=lambda i: (-longest[unit_of[i]], unit_of[i]))
            batches += [window[k : k + bs] for k in range(0, len(window), bs)]
        full = [b for b in batches if len(b) == bs]
        rest = [b for b in batches if len(b) < bs]  # at most one: the epoch's last
        order = torch.randperm(len(full), generator=g).tolist()
        return [i for b in [*(full[k] for k in order), *rest] for i in b]

    def next_batch(self, batch_size: int, drop_last: bool = False) -> list[int]:
        """The next ``batch_size`` indices; an epoch's last batch may be shorter, or with
        ``drop_last`` is skipped (so that every process of a multi-process run gets an equal share)."""
        if self.position >= self.size or (drop_last and self.position + batch_size > self.size):
            self.epoch, self.position = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        out = self._perm[self.position : self.position + batch_size]
        self.position += len(out)
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": self.size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state["seed"], state["size"]) != (self.seed, self.size):
            raise ValueError(
                f"data order was for seed {state['seed']} and {state['size']} examples, "
                f"not seed {self.seed} and {self.size}"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._perm = self._permutation(self.epoch)
