"""Preparing a model to train: dropout off everywhere it hides, activation checkpointing on."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from criteriapo.config import LoraConfig
from criteriapo.models.lora import apply_lora
from criteriapo.models.training import _keep, disable_dropout, enable_activation_checkpointing
from tests.zoo import VOCAB, zoo_model

IDS = torch.randint(3, VOCAB - 4, (2, 10), generator=torch.Generator().manual_seed(0))


def logits_twice_in_train_mode(model) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    return model(input_ids=IDS).logits, model(input_ids=IDS).logits


def test_dropout_modules_and_attention_rates_are_switched_off():
    for arch, extra in (
        ("gpt2", {}),
        ("llama", {"attention_dropout": 0.5}),
        ("phi", {"attention_dropout": 0.5}),
    ):
        model = zoo_model(arch, **extra)
        a, b = logits_twice_in_train_mode(model)
        assert not torch.equal(a, b), arch  # dropout is on: two forwards differ
        assert disable_dropout(model) > 0
        a, b = logits_twice_in_train_mode(model)
        assert torch.equal(a, b), arch
        torch.testing.assert_close(a, model.eval()(input_ids=IDS).logits)  # train mode computes as eval
        assert model.config.to_dict() == zoo_model(arch, **extra).config.to_dict()  # config untouched


def test_lora_dropout_is_switched_off_too():
    model = apply_lora(zoo_model("llama"), LoraConfig(enabled=True, r=4, dropout=0.3))
    with torch.no_grad():  # trained adapters: B is no longer zero, so their dropout shows
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    a, b = logits_twice_in_train_mode(model)
    assert not torch.equal(a, b)
    disable_dropout(model)
    a, b = logits_twice_in_train_mode(model)
    assert torch.equal(a, b)


def test_activation_checkpointing_is_switched_on():
    model = zoo_model("llama")
    enable_activation_checkpointing(model)
    assert model.is_activation_checkpointing
    assert model.config.use_cache is False
    model.train()
    ids = torch.randint(3, VOCAB - 4, (2, 10))
    model(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def packed_logps_grads(model) -> list[torch.Tensor]:
    """Gradients of a packed batch's log-probs (every kind of attention piece, see test_attention)."""
    from criteriapo.losses.logprobs import batch_logps
    from criteriapo.rows.packing import collate
    from tests.models.test_attention import segments

    model.train()
    model.zero_grad(set_to_none=True)
    batch_logps(model, collate(segments(), 0, packed=True), 10).logps.sum().backward()
    return [p.grad for p in model.parameters()]


class CountOps(TorchDispatchMode):
    """Counts the aten ops that really run. Entered around a whole forward and backward, it sits
    below selective checkpointing's own mode, so an op that mode answers from its cache is not
    counted (the profiler would count it)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def counted_ops(model) -> dict[str, int]:
    """How many times each aten op ran in one forward and backward of the packed batch."""
    with CountOps() as counter:
        packed_logps_grads(model)
    return counter.counts


KEPT = {
    "full": {},
    "keep_attention": {"keep_attention": True},
    "keep_projections": {"keep_attention": True, "keep_projections": True},
}


def test_kept_attention_and_projections_are_not_recomputed_and_change_no_gradient():
    """Selective checkpointing: the gradients of no checkpointing (grouped-query Llama and Qwen2,
    whose q, k, v have biases, through every kind of attention piece), and what is kept really skips
    its recompute: kept attention runs each attention kernel once instead of twice, the matmuls are
    recomputed as before; kept projections (attention kept too) run every matmul as often as no
    checkpointing does."""
    attention_op = "_scaled_dot_product_flash_attention_for_cpu"
    for arch in ("llama", "qwen2"):
        ops, grads = {}, {}
        for setting in ("none", *KEPT):
            model = zoo_model(arch, num_key_value_heads=2)
            model.set_attn_implementation("sdpa")
            if setting != "none":
                enable_activation_checkpointing(model, **KEPT[setting])
            grads[setting] = packed_logps_grads(model)
            ops[setting] = counted_ops(model)
        for setting in KEPT:
            for a, b in zip(grads[setting], grads["none"], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        once = ops["none"][attention_op]
        assert (ops["full"][attention_op], ops["keep_attention"][attention_op]) == (2 * once, once), arch
        assert ops["keep_projections"][attention_op] == once, arch
        assert ops["keep_attention"]["mm"] == ops["full"]["mm"] > ops["none"]["mm"], arch
        products = [{k: o.get(k, 0) for k in ("mm", "addmm")} for o in (ops["keep_projections"], ops["none"])]
        assert products[0] == products[1], (arch, products)
        if arch == "qwen2":
            assert ops["none"]["addmm"] > 0  # its biased projections are addmm, kept too


def test_kept_projections_are_the_matmuls_that_read_the_hidden_width():
    """The rule itself: a product over the hidden width is kept (with or without a bias); one over
    another width (the MLP's down projection, never recomputed) is not, and neither is anything with
    projections off."""
    aten = torch.ops.aten
    hidden, wide = torch.empty(5, 8), torch.empty(5, 24)
    keep, recompute = CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_RECOMPUTE
    assert _keep(False, 8, None, aten.mm.default, hidden, torch.empty(8, 24)) is keep
    assert _keep(False, 8, None, aten.addmm.default, torch.empty(24), hidden, torch.empty(8, 24)) is keep
    assert _keep(False, 8, None, aten.mm.default, wide, torch.empty(24, 8)) is recompute
    assert _keep(True, None, None, aten.mm.default, hidden, torch.empty(8, 24)) is recompute


def test_kept_attention_through_a_lower_right_mask(monkeypatch):
    """The GPU's way to a piece with a prefix (a lower-right causal mask, a tensor subclass that
    selective checkpointing's mode cannot make itself), taken on this CPU: the same gradients."""
    from criteriapo.models import attention

    want = packed_logps_grads(zoo_model("llama", num_key_value_heads=2))
    monkeypatch.setattr(attention, "_splits", lambda *a: False)
    made = []
    lower_right = attention._lower_right
    monkeypatch.setattr(attention, "_lower_right", lambda *a: made.append(a) or lower_right(*a))
    model = zoo_model("llama", num_key_value_heads=2)
    enable_activation_checkpointing(model, keep_attention=True)
    for a, b in zip(packed_logps_grads(model), want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert made  # the lower-right path ran
