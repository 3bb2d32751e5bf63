"""KTO (Ethayarajh et al. 2024): preference tuning from unpaired completions, each labelled
desirable or undesirable, with no pairs needed.

The reward is the log-ratio ``r = policy - reference`` of a completion; its reference point is an
estimate of KL(policy || reference) over the batch, from mismatched prompts and completions:
``z``, the mean log-ratio of those, detached and at least 0. A desirable completion's loss is
``1 - sigmoid(beta (r - z))``, an undesirable one's ``1 - sigmoid(beta (z - r))``, weighted by
``desirable_weight`` and ``undesirable_weight``; the loss is their mean, as in TRL's KTOTrainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KTOParams:
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


def kto_losses(logratios: torch.Tensor, labels: torch.Tensor, z: torch.Tensor, p: KTOParams) -> torch.Tensor:
    """Per-example losses (B,), weights applied: ``labels`` (B,) true for desirable completions."""
    desirable = p.desirable_weight * (1 - torch.sigmoid(p.beta * (logratios - z)))
    undesirable = p.undesirable_weight * (1 - torch.sigmoid(p.beta * (z - logratios)))
    return torch.where(labels, desirable, undesirable)
