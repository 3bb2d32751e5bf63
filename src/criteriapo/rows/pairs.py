"""Rows for preference pairs: a batch of B pairs becomes output sequences 0..B-1 (chosen) and
B..2B-1 (rejected), each distinct sequence computed once."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from criteriapo.data.tokenize import TokenizedPair
from criteriapo.rows.packing import collate, prompt_segment, sequence_segment

Sequence_ = tuple[Sequence[int], Sequence[int]]  # (prompt ids, completion ids)


def collate_sequences(
    seqs: Sequence[Sequence_], pad_id: int, packing: bool = True, width: int | None = None
) -> dict[str, torch.Tensor]:
    """Output sequence k is ``seqs[k]``. A sequence equal to an earlier one (same prompt and
    completion) is computed once: ``canon`` maps each output sequence to the one computed. With
    packing, a prompt's distinct completions follow it in segments no longer than ``width`` (default:
    the longest sequence); without, each distinct sequence has a padded row of its own. ``tokens``
    counts every output sequence, as if each were computed on its own."""
    n = len(seqs)
    first: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    canon = [first.setdefault((tuple(prompt), tuple(c)), k) for k, (prompt, c) in enumerate(seqs)]
    distinct = [k for k in range(n) if canon[k] == k]
    if packing:
        width = width or max(len(prompt) + len(c) for prompt, c in seqs)
        by_prompt: dict[tuple[int, ...], list[list[int]]] = {}
        for k in distinct:
            parts = by_prompt.setdefault(tuple(seqs[k][0]), [[]])
            used = len(seqs[k][0]) + sum(len(seqs[j][1]) for j in parts[-1])
            if parts[-1] and used + len(seqs[k][1]) > width:
                parts.append([])
            parts[-1].append(k)
        segments = [
            prompt_segment(prompt, [(seqs[k][1], k) for k in part])
            for prompt, parts in by_prompt.items()
            for part in parts
        ]
    else:
        segments = [
            sequence_segment([*seqs[k][0], *seqs[k][1]], [-100] * len(seqs[k][0]) + list(seqs[k][1]), k)
            for k in distinct
        ]
    batch = collate(segments, pad_id, packing)
    batch["tokens"] = torch.tensor(sum(len(prompt) + len(c) for prompt, c in seqs))
    if len(distinct) < n:
        batch["canon"] = torch.tensor(canon, dtype=torch.long)
    batch["labelled"] = torch.bincount(batch["seq"], minlength=n)[canon]  # label tokens per output
    return batch


def collate_pairs(
    pairs: Sequence[TokenizedPair], indices: Sequence[int], pad_id: int, packing: bool = True
) -> dict[str, torch.Tensor]:
    """Output sequences 0..B-1 are the chosen completions, B..2B-1 the rejected ones (see
    :func:`collate_sequences`: a reply shared by a prompt's pairs on several criteria is computed
    once). A prompt's segments are no longer than the batch's longest pair, so rows never get wider
    than one segment per pair would make them, and attention costs no more. ``chosen_tokens``
    counts every chosen sequence, as if each were computed on its own."""
    b = len(pairs)
    seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    batch = collate_sequences(seqs, pad_id, packing, width)
    batch["chosen_tokens"] = batch.pop("labelled")[:b].sum()
    batch["index"] = torch.tensor(list(indices), dtype=torch.long)
    batch["weight"] = torch.tensor([p.weight for p in pairs], dtype=torch.float32)
    return batch
