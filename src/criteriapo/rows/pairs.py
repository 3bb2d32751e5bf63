"""Rows for preference pairs: a batch of B pairs becomes output sequences 0..B-1 (chosen) and
B..2B-1 (rejected), each distinct sequence computed once."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from criteriapo.data.tokenize import TokenizedPair
from criteriapo.rows.packing import collate, prompt_segment, sequence_segment


def collate_pairs(
    pairs: Sequence[TokenizedPair], indices: Sequence[int], pad_id: int, packing: bool = True
) -> dict[str, torch.Tensor]:
    """Output sequences 0..B-1 are the chosen completions, B..2B-1 the rejected ones. A sequence
    equal to an earlier one of the batch (same prompt and completion, as when one reply is the
    chosen one of a prompt's pairs on several criteria) is computed once: ``canon`` maps each
    output sequence to the one computed. With packing, each prompt is one segment that computes it
    once for all its distinct completions; without, each distinct sequence has a padded row of its
    own with the prompt before it. ``tokens`` and ``chosen_tokens`` count every output sequence,
    as if each were computed on its own."""
    b = len(pairs)
    seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    first: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    canon = [first.setdefault((tuple(prompt), tuple(c)), k) for k, (prompt, c) in enumerate(seqs)]
    distinct = [k for k in range(2 * b) if canon[k] == k]
    if packing:
        # a prompt's distinct completions after it, in segments no longer than the longest pair: rows
        # never get wider than one segment per pair would make them, so attention costs no more
        width = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
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
            sequence_segment(seqs[k][0] + seqs[k][1], [-100] * len(seqs[k][0]) + seqs[k][1], k)
            for k in distinct
        ]
    batch = collate(segments, pad_id, packing)
    labels = torch.bincount(batch["seq"], minlength=2 * b)
    batch["tokens"] = torch.tensor(sum(len(prompt) + len(c) for prompt, c in seqs))
    batch["chosen_tokens"] = labels[canon[:b]].sum()
    if len(distinct) < 2 * b:
        batch["canon"] = torch.tensor(canon, dtype=torch.long)
    batch["index"] = torch.tensor(list(indices), dtype=torch.long)
    batch["weight"] = torch.tensor([p.weight for p in pairs], dtype=torch.float32)
    return batch
