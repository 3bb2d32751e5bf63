"""Scores: a sequence's summed log-probability of its completion tokens and their count, under one
model. A sequence's score is the unit; a pair's is two of them (chosen, rejected); KTO's example is
scored as a pair of its completion and its KL completion. Scores know how to be saved into a
checkpoint and read back (:meth:`PairScores.state`, :meth:`PairScores.from_state`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from criteriapo.data.tokenize import TokenizedPair
from criteriapo.distributed import SINGLE, World, all_gather_objects, reshard
from criteriapo.losses.logprobs import SequenceLogps, batch_logps
from criteriapo.rows.packing import packing_problem
from criteriapo.rows.pairs import collate_pairs
from criteriapo.train.allocator import keep_freed_memory
from criteriapo.train.precision import Precision, precision_of


@dataclass
class SequenceScores:
    """Per sequence: the log-probability summed over its completion tokens, and their number."""

    logps: torch.Tensor  # (N,) float
    tokens: torch.Tensor  # (N,) long

    def __len__(self) -> int:
        return self.logps.shape[0]

    def at(self, index: torch.Tensor) -> SequenceScores:
        return SequenceScores(self.logps[index], self.tokens[index])

    @property
    def per_token(self) -> torch.Tensor:
        return self.logps / self.tokens.clamp(min=1)

    @staticmethod
    def cat(parts: Sequence[SequenceScores]) -> SequenceScores:
        return SequenceScores(torch.cat([p.logps for p in parts]), torch.cat([p.tokens for p in parts]))


@dataclass
class PairScores:
    """A pair's two sequences, scored: ``chosen`` and ``rejected`` (KTO: the completion and its KL
    completion)."""

    chosen: SequenceScores
    rejected: SequenceScores

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def margins(self) -> torch.Tensor:
        """log p(chosen) - log p(rejected), summed over tokens."""
        return self.chosen.logps - self.rejected.logps

    @staticmethod
    def of_batch(out: SequenceLogps, b: int) -> PairScores:
        """A two-sided batch's (sequences 0..b-1 chosen, b..2b-1 rejected) scores, detached."""
        logps, tokens = out.logps.detach(), out.num_tokens
        return PairScores(SequenceScores(logps[:b], tokens[:b]), SequenceScores(logps[b:], tokens[b:]))

    @staticmethod
    def in_order(parts: Sequence[tuple[torch.Tensor, PairScores]]) -> PairScores:
        """Batches' scores, each with its examples' indices, as one ``PairScores`` ordered by index."""
        index = torch.cat([i.cpu() for i, _ in parts])
        order = torch.argsort(index)
        chosen = SequenceScores.cat([s.chosen for _, s in parts])
        rejected = SequenceScores.cat([s.rejected for _, s in parts])
        return PairScores(chosen.at(order), rejected.at(order))

    def state(self, name: str) -> dict[str, torch.Tensor]:
        """Tensors to save under ``name`` (read back by :meth:`from_state`); copies, so that two
        names may hold the same scores (safetensors refuses tensors that share memory)."""
        return {
            f"{name}.{side}.{field}": getattr(getattr(self, side), field).cpu().clone()
            for side in ("chosen", "rejected")
            for field in ("logps", "tokens")
        }

    @staticmethod
    def from_state(tensors: Mapping[str, torch.Tensor], name: str) -> PairScores | None:
        """The scores saved under ``name`` by :meth:`state`, or None when there are none."""
        if f"{name}.chosen.logps" not in tensors:
            return None
        sides = [
            SequenceScores(tensors[f"{name}.{s}.logps"], tensors[f"{name}.{s}.tokens"])
            for s in ("chosen", "rejected")
        ]
        return PairScores(*sides)


SequenceKey = tuple[int, tuple[int, ...]]  # (prompt length, prompt + completion ids)


def _scored(chunks: list, score: Callable, world: World, progress: Callable[[int], None] | None):
    """``(j, score(chunks[j]))`` for every chunk, in order. With several processes, process r scores
    chunks r, r + N, ...; one that runs out scores a chunk again (a sharded model's forward
    is a collective: every process must make as many) and drops the result; then the results are
    gathered, so each process gets all of them."""
    if not world.distributed:
        for j, chunk in enumerate(chunks):
            yield j, score(chunk)
            if progress is not None:
                progress(len(chunk))
        return
    mine: dict[int, tuple] = {}
    for start in range(0, len(chunks), world.size):
        j = start + world.rank
        result = score(chunks[j] if j < len(chunks) else chunks[world.rank % len(chunks)])
        if j < len(chunks):
            mine[j] = result
        if progress is not None:
            progress(sum(len(c) for c in chunks[start : start + world.size]))
    merged = {j: r for part in all_gather_objects(mine, world) for j, r in part.items()}
    assert sorted(merged) == list(range(len(chunks))), "a micro-batch's scores went missing"
    yield from sorted(merged.items())


def _todo(pairs: Sequence[TokenizedPair], keys: list[list], cache: dict) -> list[int]:
    """The pairs with a sequence not in ``cache``, a prompt's pairs together (computed once)."""
    todo = [i for i in range(len(pairs)) if keys[0][i] not in cache or keys[1][i] not in cache]
    rank = {prompt: r for r, prompt in enumerate(dict.fromkeys(tuple(pairs[i].prompt_ids) for i in todo))}
    todo.sort(key=lambda i: rank[tuple(pairs[i].prompt_ids)])
    return todo


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    micro_batch_size: int = 8,
    cache: dict[SequenceKey, tuple[float, int]] | None = None,
    packing: bool = True,
    precision: Precision | None = None,
    progress: Callable[[int], None] | None = None,
    world: World = SINGLE,
) -> PairScores:
    """Log-probs of every pair's chosen and rejected completion under ``model`` (no gradient).

    Pairs are scored in the layout training gives them (with packing, one segment per pair), so at
    step 1 the policy's log-probs equal these up to the packing of rows. Each sequence is kept once
    under its tokens; with a ``cache`` shared between calls (for one model), a pair whose two
    sequences were scored before is not scored again, e.g. across the recipes built from one dataset.
    A prompt's pairs go into one micro-batch where they fit, so that its prompt and the replies its
    pairs share are computed once.
    ``precision`` is the policy's (its autocast): the reference must be scored as the policy computes.
    ``progress(n)`` is told of each ``n`` pairs scored (those found in the cache first).
    With several processes (``world``: every one of them calls this with the same pairs and cache),
    each scores every N-th micro-batch and all receive all the scores, as one process would make
    them."""
    cache = {} if cache is None else cache
    keys = [
        [(len(p.prompt_ids), tuple(p.prompt_ids + getattr(p, side))) for p in pairs]
        for side in ("chosen_ids", "rejected_ids")
    ]
    todo = _todo(pairs, keys, cache)
    packing = packing and packing_problem(model.config) is None
    if progress is not None and len(pairs) > len(todo):
        progress(len(pairs) - len(todo))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if device.type == "cpu":
        keep_freed_memory()
    compute = (precision or precision_of(model, "auto")).context
    chunks = [todo[start : start + micro_batch_size] for start in range(0, len(todo), micro_batch_size)]

    def score(chunk: list[int]) -> tuple[list[float], list[int]]:
        batch = collate_pairs([pairs[i] for i in chunk], range(len(chunk)), pad_id, packing)
        with compute(device):
            out = batch_logps(model, {k: v.to(device) for k, v in batch.items()}, 2 * len(chunk))
        return out.logps.tolist(), out.num_tokens.tolist()

    for j, (logps, counts) in _scored(chunks, score, world, progress):  # in chunk order
        b = len(chunks[j])
        for k, i in enumerate(chunks[j]):  # a sequence shared by several pairs keeps its first score
            cache.setdefault(keys[0][i], (logps[k], counts[k]))
            cache.setdefault(keys[1][i], (logps[b + k], counts[b + k]))
    model.train(was_training)
    reshard(model)
    return _from_cache(keys, cache)


def _from_cache(keys: list[list], cache: dict) -> PairScores:
    """The scores of the pairs whose chosen and rejected sequences are ``keys[0]`` and ``keys[1]``."""
    (c_lp, c_n), (r_lp, r_n) = (
        zip(*(cache[k] for k in side), strict=True) if side else ((), ()) for side in keys
    )
    return PairScores(
        SequenceScores(torch.tensor(c_lp, dtype=torch.float32), torch.tensor(c_n, dtype=torch.long)),
        SequenceScores(torch.tensor(r_lp, dtype=torch.float32), torch.tensor(r_n, dtype=torch.long)),
    )
