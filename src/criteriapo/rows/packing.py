"""Batches without padding waste, and a DPO pair's prompt computed once.

A batch is built from *segments*. A segment is one sequence, or a prompt with the completions
that follow it, laid out as ``prompt | completion 1 | completion 2 | ...`` (a DPO pair is
``prompt | chosen | rejected``): each completion sees the prompt and itself but no other
completion, and its positions restart where the prompt ends, so the model computes the prompt once
for all of them and gets exactly the log-probs of separate sequences.

With packing, several segments share a row (first fit, longest first), each with its own position
ids, and attention gets a mask that keeps them apart. A row is never longer than the longest segment
of the batch, so attention costs no more than with padding. Without packing, each segment has a row
of its own, right-padded.

Every layout names its labels the same way: ``src`` (flat index, in the (R, L) grid, of the hidden
state that predicts the label), ``target`` (the label's token) and ``seq`` (which output sequence
the label counts for), so one log-prob function serves all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from criteriapo.errors import ConfigError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# branch of a token within its segment: the prompt, then completions 1, 2... (chosen, rejected)
SHARED, CHOSEN, REJECTED = 0, 1, 2
# attention that takes a custom (R, 1, L, L) mask; criteriapo_pieces (models.attention.PIECES) is SDPA
# that computes only the mask's allowed blocks when given the row's pieces (:func:`attention_pieces`)
MASK_IMPLEMENTATIONS = ("sdpa", "eager", "criteriapo_pieces")


@dataclass
class Segment:
    ids: list[int]
    positions: list[int]
    branch: list[int]
    src: list[int] = field(default_factory=list)  # offsets in the segment of the states that predict labels
    target: list[int] = field(default_factory=list)
    seq: list[int] = field(default_factory=list)
    tokens: int = 0  # the tokens of the sequences it stands for (a pair counts its prompt twice)


def sequence_segment(ids: Sequence[int], labels: Sequence[int], seq: int) -> Segment:
    """One sequence; ``labels`` is aligned with ``ids`` (-100: no label), and the label at t is
    predicted from position t - 1."""
    s = Segment(list(ids), list(range(len(ids))), [SHARED] * len(ids), tokens=len(ids))
    for t in range(1, len(ids)):
        if labels[t] != IGNORE_INDEX:
            s.src.append(t - 1)
            s.target.append(labels[t])
            s.seq.append(seq)
    return s


def pair_segment(
    prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int], chosen_seq: int, rejected_seq: int
) -> Segment:
    """``prompt | chosen | rejected``: :func:`prompt_segment` with two completions."""
    return prompt_segment(prompt, [(chosen, chosen_seq), (rejected, rejected_seq)])


def prompt_segment(prompt: Sequence[int], completions: Sequence[tuple[Sequence[int], int]]) -> Segment:
    """``prompt | completion 1 | completion 2 | ...`` (each given with its output sequence) with
    every completion's positions restarting after the prompt, as branches 1, 2, ... The first token
    of each completion is predicted from the prompt's last state; with an empty prompt it has no
    predecessor and no label, as in a sequence of its own. Its ``tokens`` count the prompt once per
    completion, as the separate sequences would."""
    p = len(prompt)
    s = Segment(list(prompt), list(range(p)), [SHARED] * p)
    for b, (completion, seq) in enumerate(completions, start=1):
        at = len(s.ids)
        s.ids += completion
        s.positions += range(p, p + len(completion))
        s.branch += [b] * len(completion)
        s.tokens += p + len(completion)
        for k, t in enumerate(completion):
            if p + k >= 1:
                s.src.append(p - 1 if k == 0 else at + k - 1)
                s.target.append(t)
                s.seq.append(seq)
    return s


def _rows(segments: Sequence[Segment], packed: bool) -> tuple[list[list[int]], int]:
    width = max(len(s.ids) for s in segments)
    if not packed:
        return [[i] for i in range(len(segments))], width
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(segments)), key=lambda i: -len(segments[i].ids)):
        n = len(segments[i].ids)
        r = next((r for r, free in enumerate(room) if free >= n), None)
        if r is None:
            rows.append([i])
            room.append(width - n)
        else:
            rows[r].append(i)
            room[r] -= n
    return rows, width


def collate(segments: Sequence[Segment], pad_id: int, packed: bool = True) -> dict[str, torch.Tensor]:
    """Segments -> a batch: ``input_ids`` (R, L), ``src``/``target``/``seq`` (n,), ``tokens`` (),
    and either ``attention_mask`` (R, L) when each row is one plain sequence, or ``position_ids``,
    ``segment`` and ``branch`` (R, L) from which :func:`attention_mask` builds the 4D mask."""
    rows, width = _rows(segments, packed)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    seg = torch.full(shape, -1, dtype=torch.long)  # padding is segment -1
    branch = torch.zeros(shape, dtype=torch.long)
    src: list[int] = []
    target: list[int] = []
    seq: list[int] = []
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            s = segments[i]
            end = at + len(s.ids)
            ids[r, at:end] = torch.tensor(s.ids, dtype=torch.long)
            pos[r, at:end] = torch.tensor(s.positions, dtype=torch.long)
            seg[r, at:end] = i
            branch[r, at:end] = torch.tensor(s.branch, dtype=torch.long)
            src += [r * width + at + o for o in s.src]
            target += s.target
            seq += s.seq
            at = end
    batch = {
        "input_ids": ids,
        "src": torch.tensor(src, dtype=torch.long),
        "target": torch.tensor(target, dtype=torch.long),
        "seq": torch.tensor(seq, dtype=torch.long),
        "tokens": torch.tensor(sum(s.tokens for s in segments)),
    }
    if all(len(m) == 1 for m in rows) and not bool((branch != SHARED).any()):
        batch["attention_mask"] = (seg >= 0).long()
    else:
        batch |= {"position_ids": pos, "segment": seg, "branch": branch}
    return batch


def packing_problem(config: Any) -> str | None:
    """Why packed rows would give this model wrong log-probs, or None. They are exact when every
    layer is full attention under the mask given to it and positions come from ``position_ids``.
    A composite model (Gemma 3 as ``AutoModelForCausalLM`` loads it) keeps these in its text config.
    The guard (:mod:`criteriapo.train.guard`) checks the answer on the first batch."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    implementation = (
        getattr(text, "_attn_implementation", None)
        or getattr(config, "_attn_implementation", None)
        or "eager"
    )
    if implementation not in MASK_IMPLEMENTATIONS:
        return f"its attention ({implementation}) takes no custom mask"
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"]) - {"full_attention"}
    if kinds:
        return f"it has {', '.join(sorted(kinds))} layers, which would see across packed sequences"
    window = getattr(text, "sliding_window", None)
    if window and getattr(text, "use_sliding_window", True) is not False:  # 0 or None: no window
        return f"it attends within a sliding window ({window}), which a custom mask would override"
    model_type = getattr(config, "model_type", "")
    if getattr(text, "alibi", False) or model_type in ("bloom", "mpt"):
        return "it places tokens by ALiBi biases, not position ids"
    return None


def resolve_packing(model: torch.nn.Module, wanted: bool, key: str) -> bool:
    """``wanted``, unless the model cannot take packed rows: then one padded row per sequence."""
    problem = packing_problem(model.config) if wanted else None
    if problem:
        log.warning("%s: off for this model, because %s; one padded row per sequence", key, problem)
    return wanted and problem is None


def attention_mask(segment: torch.Tensor, branch: torch.Tensor, implementation: str, dtype: torch.dtype):
    """(R, L) segment ids and branches -> the (R, 1, L, L) mask: token i attends token j when both
    are in one segment, j is not after i, and j is in the prompt or in i's own completion (a
    rejected token never sees a chosen one). Padding attends padding, so no row is empty (SDPA
    gives NaN for an empty row)."""
    if implementation not in MASK_IMPLEMENTATIONS:
        raise ConfigError(
            f"packed batches need attention that takes a custom mask ({', '.join(MASK_IMPLEMENTATIONS)}); "
            f"this model uses {implementation!r}. Set train.packing: false"
        )
    length = segment.shape[1]
    same = segment[:, :, None] == segment[:, None, :]  # (R, L, L)
    causal = torch.ones(length, length, dtype=torch.bool, device=segment.device).tril()
    crossed = (branch[:, None, :] != SHARED) & (branch[:, :, None] != branch[:, None, :])
    allowed = (same & causal & ~crossed)[:, None]  # (R, 1, L, L)
    if implementation != "eager":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segment.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def attention_pieces(segment: torch.Tensor, branch: torch.Tensor) -> list[list[tuple[int, int, int, int]]]:
    """(R, L) segment ids and branches -> each row's pieces for :mod:`criteriapo.models.attention`:
    ``(q0, q1, p0, p1)``, queries [q0, q1) attending keys [p0, p1) and then themselves causally.
    A segment gives its prompt with its first completion (no prefix: plain causal), then each
    further completion with the prompt as prefix. Padding (segment -1) is in no piece."""
    seg, br = segment.cpu(), branch.cpu()
    change = torch.ones_like(seg, dtype=torch.bool)
    change[:, 1:] = (seg[:, 1:] != seg[:, :-1]) | (br[:, 1:] != br[:, :-1])
    out = []
    for r in range(seg.shape[0]):
        starts = torch.nonzero(change[r]).flatten().tolist()
        ends = [*starts[1:], seg.shape[1]]
        runs = [(s, e, int(seg[r, s]), int(br[r, s])) for s, e in zip(starts, ends, strict=True)]
        out.append(_row_pieces([run for run in runs if run[2] >= 0]))
    return out


def _row_pieces(runs: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Runs (start, end, segment, branch) of one row, in order -> its pieces."""
    row: list[tuple[int, int, int, int]] = []
    prompt = (0, 0, -1)  # the current segment's prompt run: start, end, segment
    for start, end, seg, b in runs:
        if b == SHARED:
            prompt = (start, end, seg)
            row.append((start, end, start, start))
        elif prompt[2] == seg and prompt[1] == start:
            row[-1] = (prompt[0], end, prompt[0], prompt[0])  # the first completion: one causal block
        elif prompt[2] == seg:
            row.append((start, end, prompt[0], prompt[1]))
        else:  # a segment with an empty prompt: each completion alone
            row.append((start, end, start, start))
    return row
