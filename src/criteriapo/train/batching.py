"""Seeded data order with a resumable position."""

from __future__ import annotations

import torch


class DataOrder:
    """A fresh seeded permutation each epoch; ``state_dict`` records where the next batch starts."""

    def __init__(self, size: int, seed: int):
        if size < 1:
            raise ValueError("no training examples")
        self.size, self.seed = size, seed
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g).tolist()

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
