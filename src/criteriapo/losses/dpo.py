"""The DPO family as small pure functions over per-sequence log-probs.

Each takes policy and reference log-probs of chosen and rejected completions, shape (B,), and
returns per-pair losses (B,). Rewards are computed once, outside, as beta * (policy - reference).
Adding a loss is one function and one line in ``LOSSES``.

Notation: pc, pr = policy log p(chosen), log p(rejected); rc, rr = the same under the reference
(zeros when reference-free).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from criteriapo.errors import ConfigError


@dataclass(frozen=True)
class LossParams:
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5


@dataclass(frozen=True)
class LogPs:
    pc: torch.Tensor
    pr: torch.Tensor
    rc: torch.Tensor
    rr: torch.Tensor

    @property
    def logits(self) -> torch.Tensor:
        """The DPO logit: (pc - pr) - (rc - rr)."""
        return (self.pc - self.pr) - (self.rc - self.rr)


def sigmoid(x: LogPs, p: LossParams) -> torch.Tensor:
    """DPO (Rafailov et al. 2023); with label_smoothing > 0, conservative DPO (cDPO)."""
    z = p.beta * x.logits
    return -F.logsigmoid(z) * (1 - p.label_smoothing) - F.logsigmoid(-z) * p.label_smoothing


def robust(x: LogPs, p: LossParams) -> torch.Tensor:
    """rDPO (Chowdhury et al. 2024): unbiased under a label-flip rate of label_smoothing."""
    z = p.beta * x.logits
    eps = p.label_smoothing
    return (-F.logsigmoid(z) * (1 - eps) + F.logsigmoid(-z) * eps) / (1 - 2 * eps)


def hinge(x: LogPs, p: LossParams) -> torch.Tensor:
    """SLiC (Zhao et al. 2023): a hinge on the scaled logit."""
    return torch.relu(1 - p.beta * x.logits)


def ipo(x: LogPs, p: LossParams) -> torch.Tensor:
    """IPO (Azar et al. 2023): regress the logit to 1/(2 beta). Uses length-averaged log-probs."""
    return (x.logits - 1 / (2 * p.beta)) ** 2


def apo_zero(x: LogPs, p: LossParams) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024): push chosen likelihood up and rejected down."""
    chosen = 1 - torch.sigmoid(p.beta * (x.pc - x.rc))
    rejected = torch.sigmoid(p.beta * (x.pr - x.rr))
    return chosen + rejected


def sppo_hard(x: LogPs, p: LossParams) -> torch.Tensor:
    """SPPO with hard labels (Wu et al. 2024): chosen ratio to +1/2, rejected to -1/2 (over beta)."""
    return (x.pc - x.rc - 0.5 / p.beta) ** 2 + (x.pr - x.rr + 0.5 / p.beta) ** 2


def nca_pair(x: LogPs, p: LossParams) -> torch.Tensor:
    """NCA (Chen et al. 2024), pairwise form."""
    chosen = p.beta * (x.pc - x.rc)
    rejected = p.beta * (x.pr - x.rr)
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def simpo(x: LogPs, p: LossParams) -> torch.Tensor:
    """SimPO (Meng et al. 2024): reference-free, length-averaged, with a target margin gamma."""
    z = p.beta * (x.pc - x.pr) - p.simpo_gamma
    return -F.logsigmoid(z) * (1 - p.label_smoothing) - F.logsigmoid(-z) * p.label_smoothing


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_log_odds(x: LogPs) -> torch.Tensor:
    """log odds(chosen) - log odds(rejected), odds(y) = p / (1 - p) with p the per-token average
    probability (pc and pr are per-token averages)."""
    return (x.pc - x.pr) - (_log1mexp(x.pc) - _log1mexp(x.pr))


def orpo(x: LogPs, p: LossParams) -> torch.Tensor:
    """ORPO (Hong et al. 2024): the odds-ratio term, beta (the paper's lambda) times -log sigmoid of
    the log odds ratio. No reference; the NLL of the chosen reply is the rest of the loss
    (``LossSpec.chosen_nll``), so ORPO needs no SFT stage before it."""
    return -p.beta * F.logsigmoid(orpo_log_odds(x))


def orpo_metrics(x: LogPs, p: LossParams) -> dict[str, torch.Tensor]:
    """Per pair, as TRL's ORPO trainer names their means."""
    log_odds = orpo_log_odds(x)
    return {"log_odds_ratio": F.logsigmoid(log_odds), "log_odds_chosen": log_odds}


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[[LogPs, LossParams], torch.Tensor]
    length_normalized: bool = False  # log-probs averaged over completion tokens
    reference_free: bool = False  # never uses a reference model
    # rewards/* from the per-token averages the loss sees (SimPO, as TRL's CPO trainer logs them);
    # otherwise from whole-sequence log-probs (IPO included, as TRL's DPO trainer logs them)
    averaged_rewards: bool = False
    # weight of the chosen replies' NLL (per token, over the step) that is part of the loss itself;
    # dpo.rpo_alpha adds it to any other loss
    chosen_nll: float = 0.0
    # per-pair values logged (their means) beside the rewards, under these names
    metrics: Callable[[LogPs, LossParams], dict[str, torch.Tensor]] | None = None


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid),
    "robust": LossSpec(robust),
    "hinge": LossSpec(hinge),
    "ipo": LossSpec(ipo, length_normalized=True),
    "apo_zero": LossSpec(apo_zero),
    "sppo_hard": LossSpec(sppo_hard),
    "nca_pair": LossSpec(nca_pair),
    "simpo": LossSpec(simpo, length_normalized=True, reference_free=True, averaged_rewards=True),
    "orpo": LossSpec(
        orpo,
        length_normalized=True,
        reference_free=True,
        averaged_rewards=True,
        chosen_nll=1.0,
        metrics=orpo_metrics,
    ),
}


def loss_spec(name: str) -> LossSpec:
    """The loss ``dpo.loss_type`` names; a :class:`ConfigError` listing the choices otherwise."""
    if name not in LOSSES:
        raise ConfigError(f"dpo.loss_type: unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]


def rewards(x: LogPs, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards beta * (policy - reference) of chosen and rejected, detached."""
    return (beta * (x.pc - x.rc)).detach(), (beta * (x.pr - x.rr)).detach()
