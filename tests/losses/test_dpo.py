"""DPO losses against numbers worked out by hand.

The pair: policy log p(chosen) = -1, log p(rejected) = -2; reference -1.5 for both.
So the DPO logit is (-1 - -2) - (-1.5 - -1.5) = 1, and with beta = 0.5, z = beta * logit = 0.5.
log sigmoid(0.5) = -log(1 + e^-0.5) = -0.474077; log sigmoid(-0.5) = -0.974077.
"""

from __future__ import annotations

import pytest
import torch

from criteriapo.losses.dpo import LOSSES, LogPs, LossParams, rewards


def pair(requires_grad: bool = False) -> LogPs:
    t = lambda v: torch.tensor([v], requires_grad=requires_grad)  # noqa: E731
    return LogPs(t(-1.0), t(-2.0), t(-1.5), t(-1.5))


@pytest.mark.parametrize(
    "loss, beta, eps, expected",
    [
        ("sigmoid", 0.5, 0.0, 0.474077),  # -log sigmoid(0.5)
        ("sigmoid", 0.5, 0.1, 0.524077),  # cDPO: 0.9 * 0.474077 + 0.1 * 0.974077
        ("robust", 0.5, 0.1, 0.411578),  # (0.9 * 0.474077 - 0.1 * 0.974077) / 0.8
        ("robust", 0.5, 0.0, 0.474077),  # no noise: plain DPO
        ("hinge", 0.5, 0.0, 0.5),  # relu(1 - 0.5)
        ("ipo", 0.25, 0.0, 1.0),  # (1 - 1/(2*0.25))^2 = (1 - 2)^2
        ("ipo", 0.5, 0.0, 0.0),  # (1 - 1)^2
        ("apo_zero", 0.5, 0.0, 0.875646),  # 1 - sigmoid(0.25) + sigmoid(-0.25) = 1 - 0.562177 + 0.437823
        ("sppo_hard", 0.5, 0.0, 0.5),  # (0.5 - 1)^2 + (-0.5 + 1)^2
        ("sppo_hard", 0.25, 0.0, 4.5),  # (0.5 - 2)^2 + (-0.5 + 2)^2
        ("nca_pair", 0.5, 0.0, 1.276878),  # 0.575939 + 0.5 * 0.825939 + 0.5 * 0.575939
        ("simpo", 0.5, 0.0, 0.693147),  # z = 0.5 * 1 - gamma 0.5 = 0 -> log 2
    ],
)
def test_loss_values(loss, beta, eps, expected):
    got = LOSSES[loss].fn(pair(), LossParams(beta=beta, label_smoothing=eps, simpo_gamma=0.5))
    assert float(got) == pytest.approx(expected, abs=2e-6)


def test_sigmoid_gradient_by_hand():
    """d loss / d pc = -beta * sigmoid(-z) = -0.5 * 0.377541; d loss / d pr is its opposite."""
    x = pair(requires_grad=True)
    LOSSES["sigmoid"].fn(x, LossParams(beta=0.5)).sum().backward()
    assert float(x.pc.grad) == pytest.approx(-0.188771, abs=1e-6)
    assert float(x.pr.grad) == pytest.approx(0.188771, abs=1e-6)
    assert float(x.rc.grad) == pytest.approx(0.188771, abs=1e-6)  # the reference enters with opposite sign


def test_rewards_and_reference_free():
    chosen, rejected = rewards(pair(), beta=0.5)
    assert (float(chosen), float(rejected)) == (0.25, -0.25)  # 0.5 * (-1 + 1.5), 0.5 * (-2 + 1.5)
    free = LogPs(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.zeros(1), torch.zeros(1))
    assert float(LOSSES["sigmoid"].fn(free, LossParams(beta=0.5))) == pytest.approx(0.474077, abs=2e-6)
