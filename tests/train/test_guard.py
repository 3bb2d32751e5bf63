"""The guard stops a model whose forward does something to its logits that our path does not, and
switches packing off for a model that packed rows would get wrong."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from criteriapo.losses.logprobs import logit_transform, sequence_logps
from criteriapo.rows.packing import packing_problem
from criteriapo.train.guard import ModelCheckError, check_logprobs, guard_model
from tests.train.test_packing import SMALL, pairs
from tests.zoo import zoo_model


class ScaledHead(LlamaForCausalLM):
    """A custom head: the forward multiplies its logits by 3, which nothing in the config says."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3
        return out


class FixedPositions(LlamaForCausalLM):
    """Ignores the position ids it is given (as a model with its own position scheme would)."""

    def __init__(self, config):
        super().__init__(config)
        forward = self.model.forward

        def without_positions(*args, position_ids=None, **kwargs):
            return forward(*args, **kwargs)

        self.model.forward = without_positions


def sequences() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 60, (3, 20), generator=g).tolist()


def test_a_model_that_scales_its_logits_unannounced_is_stopped():
    torch.manual_seed(0)
    model = ScaledHead(LlamaConfig(**SMALL))
    with pytest.raises(
        ModelCheckError, match=r"differ from the model's own logits by up to [0-9.]+ per token"
    ):
        check_logprobs(model, sequences(), 0)
    torch.manual_seed(0)
    check_logprobs(LlamaForCausalLM(LlamaConfig(**SMALL)), sequences(), 0)  # the same model, unscaled


def test_half_precision_weights_are_checked_too():
    torch.manual_seed(0)
    scaled = ScaledHead(LlamaConfig(**SMALL)).to(torch.bfloat16)
    with pytest.raises(ModelCheckError, match="on average"):
        check_logprobs(scaled, sequences(), 0)
    check_logprobs(zoo_model("granite").to(torch.bfloat16), sequences(), 0)


def test_the_transform_is_calibrated_to_what_the_forward_does():
    # transformers' composite Gemma 3 ignores a soft cap in its text config; Gemma 2 applies its own
    model = zoo_model("gemma3", final_logit_softcapping=2.0).eval()
    assert logit_transform(model.config).softcap == 2.0  # what the config alone suggests
    assert check_logprobs(model, sequences(), 0).softcap is None
    ids = torch.tensor(sequences())
    labels = ids.clone()
    own = model(input_ids=ids).logits.float().log_softmax(-1)[:, :-1]
    want = own.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)
    got = sequence_logps(model, ids, torch.ones_like(ids), labels).logps
    # sums near -92 in fp32, whose spacing there is 7.6e-6: a few units of rounding, which the
    # machine changes (1.5e-5 seen on one); the soft cap applied wrongly would move them by 1.2e-3,
    # 12x this tolerance (1.0e-4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert check_logprobs(zoo_model("gemma2").eval(), sequences(), 0).softcap == 5.0


def test_packing_that_gives_other_log_probs_is_switched_off(caplog):
    torch.manual_seed(0)
    model = FixedPositions(LlamaConfig(**SMALL))
    assert packing_problem(model.config) is None  # nothing in the config gives it away
    with caplog.at_level(logging.WARNING):
        assert guard_model(model, pairs(), "dpo", 0, packing=True) is False
    assert "dpo.train.packing: off for this model" in caplog.text
    torch.manual_seed(0)
    assert guard_model(LlamaForCausalLM(LlamaConfig(**SMALL)), pairs(), "dpo", 0, packing=True) is True
