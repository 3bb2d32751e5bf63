"""Checks, before training starts, that the fast paths give the model's own numbers.

Training never asks the model for full-vocabulary logits: :mod:`criteriapo.losses.logprobs` applies
the output layer itself, and packed rows replace padding (:mod:`criteriapo.rows.packing`). Both
are exact only if they do what the model's own forward does, and an architecture we have not seen
may do something else. So, on a few of the run's own sequences (one small forward each):

- **log-probs**: our per-token log-probs against ``log_softmax(model(...).logits)``. The logit
  transform is calibrated here: among the transforms the config suggests, the one that matches the
  model's forward is kept; when none does, the run stops, naming the difference.
- **packing**: the first examples packed against one padded row per sequence. A difference switches
  packing off, with the reason in the log.

Tolerances are per token. Float32 weights: at most 1e-4 on every token. Half-precision weights,
where another matmul kernel may move a logit by one bf16 step: at most 1e-2 on average and 0.25 on
any token (a transform the path lacks shifts every token). Packing: 1e-4 per token of each sequence
for float32 weights, 2e-2 for half precision.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from criteriapo.errors import CriteriaPOError
from criteriapo.losses.logprobs import LogitTransform, batch_logps, logit_transform, set_logit_transform
from criteriapo.rows.packing import resolve_packing
from criteriapo.rows.pairs import collate_pairs
from criteriapo.train.precision import weights_dtype
from criteriapo.train.tasks import SFTTask

log = logging.getLogger(__name__)

PROBE_EXAMPLES = 4  # the first of the training data
PROBE_SEQUENCES = 4
PROBE_TOKENS = 48


class ModelCheckError(CriteriaPOError):
    """Our log-prob path does not reproduce the model's own distribution."""


def _full_precision(model: torch.nn.Module) -> bool:
    return weights_dtype(model) == torch.float32


def tolerance(model: torch.nn.Module) -> float:
    """Per token of a sequence, for packed against padded."""
    return 1e-4 if _full_precision(model) else 2e-2


def _matches(diff: torch.Tensor, model: torch.nn.Module) -> bool:
    """Per-token differences ``diff`` (n,) within the log-prob check's tolerance."""
    if _full_precision(model):
        return float(diff.max()) <= 1e-4
    return float(diff.mean()) <= 1e-2 and float(diff.max()) <= 0.25


def _candidates(config) -> list[LogitTransform]:
    """The config's transform first, then the same without each of its parts."""
    first = logit_transform(config)
    out = [first, replace(first, softcap=None), replace(first, multiplier=1.0, divisor=1.0), LogitTransform()]
    return list(dict.fromkeys(out))


def _probe_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows; every token after the first is a label, each its own output sequence."""
    rows = [list(s[:PROBE_TOKENS]) for s in sequences if len(s) >= 2][:PROBE_SEQUENCES]
    if not rows:
        raise ValueError("the log-prob check needs a sequence of at least 2 tokens")
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(rows):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    keep = mask[:, 1:].bool()  # (R, L-1): position t predicts token t+1
    r, c = torch.nonzero(keep, as_tuple=True)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "src": r * width + c,
        "target": ids[:, 1:][keep],
        "seq": torch.arange(len(r)),
    }


@torch.no_grad()
def check_logprobs(model: torch.nn.Module, sequences: Sequence[Sequence[int]], pad_id: int) -> LogitTransform:
    """Our per-token log-probs against the model's own logits; keeps the matching transform on the
    model, or raises :class:`ModelCheckError`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in _probe_batch(sequences, pad_id).items()}
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        own = logits.float().log_softmax(-1).flatten(0, 1)[batch["src"]]  # (n, V): states that predict
        own = own.gather(-1, batch["target"][:, None]).squeeze(-1)  # (n,)
        n = len(batch["target"])
        errors = {}
        for t in _candidates(model.config):
            set_logit_transform(model, t)
            diff = (batch_logps(model, batch, n).logps - own).abs()
            errors[t] = (float(diff.max()), float(diff.mean()))
            if _matches(diff, model):
                if t != logit_transform(model.config):
                    log.info("log-probs: this model's forward applies %s to its logits", t)
                return t
    finally:
        model.train(was_training)
    set_logit_transform(model, None)
    config = model.config
    worst, mean = min(errors.values())
    tol = "1e-4" if _full_precision(model) else "1e-2 on average, 0.25 at most"
    raise ModelCheckError(
        f"{type(model).__name__} ({getattr(config, 'model_type', '?')}): CriteriaPO's log-probs differ from "
        f"the model's own logits by up to {worst:.3g} per token, {mean:.3g} on average (tolerance {tol}) "
        f"on {n} tokens of the first examples: its forward changes the logits in a way CriteriaPO does "
        "not reproduce, so it would train on another distribution than the one the model generates "
        "with. This architecture is not supported; please report it with its config.json"
    )


@torch.no_grad()
def packing_matches(
    model: torch.nn.Module, layout: Callable[[bool], tuple[dict[str, torch.Tensor], int]]
) -> tuple[bool, float]:
    """Whether the packed layout of some examples gives their padded log-probs; and the largest
    difference per token. ``layout(packed)`` returns the batch and its number of output sequences."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        outs = []
        for packed in (True, False):
            batch, n = layout(packed)
            outs.append(batch_logps(model, {k: v.to(device) for k, v in batch.items()}, n))
    finally:
        model.train(was_training)
    packed, padded = outs
    per_token = (packed.logps - padded.logps).abs() / padded.num_tokens.clamp(min=1)
    worst = float(per_token.max()) if per_token.numel() else 0.0
    return worst <= tolerance(model), worst


def guard_model(model: torch.nn.Module, examples: Sequence, kind: str, pad_id: int, packing: bool) -> bool:
    """Both checks on the first training examples (``kind``: sft or dpo). Stops the run when our
    log-probs are not the model's own; returns whether packing stays on."""
    head = list(examples[:PROBE_EXAMPLES])
    if kind == "sft":
        check_logprobs(model, [e.input_ids for e in head], pad_id)
    else:
        check_logprobs(model, [e.prompt_ids + e.chosen_ids for e in head], pad_id)
    key = f"{kind}.train.packing"
    if not resolve_packing(model, packing, key):
        return False

    def layout(packed: bool) -> tuple[dict[str, torch.Tensor], int]:
        if kind == "sft":
            return SFTTask(pad_id, packed).collate(head, range(len(head))), len(head)
        return collate_pairs(head, range(len(head)), pad_id, packed), 2 * len(head)

    same, worst = packing_matches(model, layout)
    if not same:
        log.warning(
            "%s: off for this model: on the first %d examples packed rows gave log-probs %.3g per token "
            "away from padded ones; one padded row per sequence",
            key,
            len(head),
            worst,
        )
    return same
