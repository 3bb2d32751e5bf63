"""ORPO's and KTO's losses on numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from criteriapo.losses.dpo import LOSSES, LogPs, LossParams
from criteriapo.losses.kto import KTOParams, kto_losses


def test_orpo_by_hand():
    # per-token average probabilities 1/2 (odds 1) and 1/5 (odds 1/4): log odds ratio ln 4;
    # beta 0.1: loss -0.1 * ln sigmoid(ln 4) = -0.1 * ln(4/5)
    x = LogPs(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]), torch.zeros(1), torch.zeros(1))
    spec = LOSSES["orpo"]
    assert float(spec.fn(x, LossParams(beta=0.1))) == pytest.approx(-0.1 * math.log(0.8), rel=1e-6)
    metrics = spec.metrics(x, LossParams(beta=0.1))
    assert float(metrics["log_odds_chosen"]) == pytest.approx(math.log(4), rel=1e-6)
    assert float(metrics["log_odds_ratio"]) == pytest.approx(math.log(0.8), rel=1e-6)
    assert spec.reference_free and spec.length_normalized and spec.chosen_nll == 1.0


def test_kto_by_hand():
    # log-ratio 2 against a reference point 1, beta 0.5: a desirable completion loses
    # 1 - sigmoid(0.5) = 0.3775..., an undesirable one 1 - sigmoid(-0.5) = 0.6224..., times its weight
    r, z = torch.tensor([2.0, 2.0]), torch.tensor(1.0)
    labels = torch.tensor([True, False])
    out = kto_losses(r, labels, z, KTOParams(beta=0.5, desirable_weight=1.0, undesirable_weight=2.0))
    assert out.tolist() == pytest.approx([0.3775406688, 2 * 0.6224593312], rel=1e-6)
