"""Per-sequence log-probabilities of completion tokens, without building full-vocabulary logits.

Only positions that carry a label go through the output layer, in chunks; each chunk's logits are
made again in backward instead of stored. Peak extra memory is one chunk of (chunk_size, vocab)
floats rather than (batch, length, vocab), made in one buffer reused for every chunk
(:class:`_TokenLogps`; under autocast the stock ops, checkpointed per chunk).

The output layer is applied here, not by the model's forward, so whatever that forward does to its
logits after the output layer must be done here too: :func:`logit_transform` knows the transforms
of the architectures transformers ships (a scale, a final soft cap), and
:mod:`criteriapo.train.guard` checks this path against the model's own logits before training, so
a model that does something else is refused instead of trained on another distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from criteriapo.models.attention import use_pieces
from criteriapo.rows.packing import attention_mask, attention_pieces

CHUNK_TOKENS = 256  # a (256, 128k) chunk of float32 logits is 128 MiB


@dataclass
class SequenceLogps:
    logps: torch.Tensor  # (N,) sum of log p(label) over each sequence's labelled tokens
    num_tokens: torch.Tensor  # (N,) labelled tokens per sequence
    logits_sum: torch.Tensor  # (N,) sum over labelled positions and vocabulary of the logits (detached)


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward does to the output layer's result: ``logits * multiplier / divisor``
    (in the model's dtype, as its forward does), then ``softcap * tanh(logits / softcap)``."""

    multiplier: float = 1.0
    divisor: float = 1.0
    softcap: float | None = None


# model_type prefix -> (config attribute, how it scales the logits), as in each model's forward
_SCALES: dict[str, tuple[str, str]] = {
    "granite": ("logits_scaling", "divide"),  # granite, granitemoe*, granite_* (logits / logits_scaling)
    "hyperclovax": ("logits_scaling", "multiply"),
    "cohere": ("logit_scale", "multiply"),  # cohere, cohere2, cohere2_moe
    "falcon_h1": ("lm_head_multiplier", "multiply"),
}


def logit_transform(config: Any) -> LogitTransform:
    """The transform ``config`` implies, read from a composite model's text config too. What the
    forward really does can differ by class and version (transformers' composite Gemma 3 ignores a
    soft cap in its text config; Gemma 3n applies it): the guard calibrates against the forward."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    multiplier = divisor = 1.0
    model_type = getattr(config, "model_type", "")
    for prefix, (attr, how) in _SCALES.items():
        value = getattr(text, attr, None) or getattr(config, attr, None)
        if value and model_type.startswith(prefix):
            if how == "divide":
                divisor = float(value)
            else:
                multiplier = float(value)
    softcap = getattr(text, "final_logit_softcapping", None) or getattr(
        config, "final_logit_softcapping", None
    )
    return LogitTransform(multiplier, divisor, softcap or None)


_TRANSFORM_ATTR = "_criteriapo_logit_transform"


def set_logit_transform(model: torch.nn.Module, transform: LogitTransform | None) -> None:
    """Fix the transform used for ``model`` (as calibrated against its forward by the guard); None
    goes back to the one its config implies. Kept on the output layer, so it follows the model
    through LoRA and FSDP wrappers and is never saved."""
    setattr(model.get_output_embeddings(), _TRANSFORM_ATTR, transform)


def _transform_of(model: torch.nn.Module, head: torch.nn.Module) -> LogitTransform:
    return getattr(head, _TRANSFORM_ATTR, None) or logit_transform(model.config)


def _chunk_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    transform: LogitTransform,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk through the stock ops (autograd records them): the path under autocast, whose
    casts and their gradients are kept as they are."""
    logits = torch.nn.functional.linear(hidden, weight, bias)  # (n, H) @ (H, V) -> (n, V)
    if transform.multiplier != 1.0:
        logits = logits * transform.multiplier
    if transform.divisor != 1.0:
        logits = logits / transform.divisor
    logits = logits.float()
    if transform.softcap:
        logits = transform.softcap * torch.tanh(logits / transform.softcap)
    logp = logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (n,)
    return logp, logits.detach().sum(-1)


class _Logits:
    """A chunk's logits made in one reused (chunk, V) buffer, in place where the stock ops would
    allocate: the same ops in the same order as :func:`_chunk_logps`, so the same values. A fresh
    (chunk, V) tensor for every product and every step of the softmax cost a CPU mostly page faults
    (tens of MiB each, above glibc's mmap threshold) and an extra pass over memory per step."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, transform: LogitTransform, rows: int):
        self.weight, self.bias, self.transform = weight, bias, transform
        self.buffer = weight.new_empty(rows, weight.shape[0])
        self.tanh: torch.Tensor | None = None  # the soft cap's tanh, which its backward reads

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, V) float32 logits of (n, H) ``hidden``, transformed as the model's forward does."""
        out = self.buffer[: hidden.shape[0]]
        if self.bias is None:
            torch.mm(hidden, self.weight.t(), out=out)
        else:
            torch.addmm(self.bias, hidden, self.weight.t(), out=out)
        t = self.transform
        if t.multiplier != 1.0:
            out.mul_(t.multiplier)
        if t.divisor != 1.0:
            out.div_(t.divisor)
        logits = out.float()  # itself in float32
        if t.softcap:
            self.tanh = (logits / t.softcap).tanh_()
            logits = self.tanh * t.softcap
        return logits


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(logits, -1)`` as it computes it (maximum, shifted exponentials, their sum's
    log), the exponentials made in ``logits``' own memory: afterwards it holds exp(logits - max)."""
    maxes = logits.amax(-1, keepdim=True)
    maxes.masked_fill_(maxes.abs() == float("inf"), 0)
    return logits.sub_(maxes).exp_().sum(-1).log_().add_(maxes.squeeze(-1))


class _TokenLogps(torch.autograd.Function):
    """log p(label) for (n, H) ``hidden`` through the output layer, chunk by chunk, no chunk's logits
    kept: backward makes each chunk's again and turns them into its gradient in place
    (``softmax - one-hot``, times the incoming gradient), then adds the chunk's products to one
    hidden-state gradient and one weight gradient (made in the weight's own layout, so a tied
    embedding's gradient is added to it in place: two copies of its size at the end of backward, not
    three). The stock ops with autograd (:func:`_chunk_logps` under checkpointing) make a (chunk, V)
    tensor for each product, each softmax step and each gradient, and a weight-sized gradient per
    chunk that is then added to the others."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, transform, chunk):
        logps, sums, lses = _forward_chunks(hidden, weight, bias, labels, transform, chunk)
        ctx.save_for_backward(hidden, weight, bias, labels, lses)
        ctx.transform, ctx.chunk = transform, chunk
        ctx.mark_non_differentiable(sums)
        return logps, sums

    @staticmethod
    def backward(ctx, grad, _sums_grad):
        hidden, weight, bias, labels, lses = ctx.saved_tensors
        t, chunk = ctx.transform, ctx.chunk
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        make = _Logits(weight, bias, t, min(chunk, hidden.shape[0]))
        d_hidden = torch.empty_like(hidden) if want_h else None
        d_weight = d_bias = None
        for start in range(0, hidden.shape[0], chunk):
            stop = min(start + chunk, hidden.shape[0])
            h, g = hidden[start:stop], grad[start:stop]
            logits = make(h)
            # d logp / d logits = one-hot(label) - softmax: the logsumexp's part, then the label's
            d = logits.sub_(lses[start:stop, None]).exp_().mul_(-g[:, None])
            rows = torch.arange(stop - start, device=d.device)
            d[rows, labels[start:stop]] += g
            if t.softcap:  # logits = softcap * tanh(z / softcap)
                d.mul_(t.softcap).mul_(1 - make.tanh * make.tanh).div_(t.softcap)
            d = d.to(weight.dtype)
            if t.divisor != 1.0:
                d.div_(t.divisor)
            if t.multiplier != 1.0:
                d.mul_(t.multiplier)
            if want_h:
                torch.mm(d, weight, out=d_hidden[start:stop])
            if want_w:
                d_weight = d.t() @ h if d_weight is None else d_weight.addmm_(d.t(), h)
            if want_b:
                d_bias = d.sum(0) if d_bias is None else d_bias.add_(d.sum(0))
        return d_hidden, d_weight, d_bias, None, None, None


def _forward_chunks(hidden, weight, bias, labels, transform: LogitTransform, chunk: int):
    """log p(label), the sum of the logits and their logsumexp at each of ``hidden``'s positions."""
    n = hidden.shape[0]
    logps, sums, lses = (hidden.new_empty(n, dtype=torch.float32) for _ in range(3))
    make = _Logits(weight, bias, transform, min(chunk, n))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        logits = make(hidden[start:stop])
        picked = logits.gather(-1, labels[start:stop, None]).squeeze(-1)
        torch.sum(logits, -1, out=sums[start:stop])
        lses[start:stop] = _logsumexp_(logits)
        torch.sub(picked, lses[start:stop], out=logps[start:stop])
    return logps, sums, lses


def token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    transform: LogitTransform = LogitTransform(),
    chunk: int = CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label) at each of ``hidden``'s positions (n, H), and the sum of each position's logits."""
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    tracked = (t for t in (hidden, weight, bias) if t is not None)
    wanted = torch.is_grad_enabled() and any(t.requires_grad for t in tracked)
    if not torch.is_autocast_enabled(hidden.device.type) and hidden.dtype == weight.dtype:
        if wanted:
            return _TokenLogps.apply(hidden, weight, bias, labels, transform, chunk)
        with torch.no_grad():
            return _forward_chunks(hidden, weight, bias, labels, transform, chunk)[:2]
    logps, sums = [], []
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start : start + chunk], labels[start : start + chunk]
        if wanted:
            lp, s = checkpoint(_chunk_logps, h, weight, bias, y, transform, use_reentrant=False)
        else:
            lp, s = _chunk_logps(h, weight, bias, y, transform)
        logps.append(lp)
        sums.append(s)
    return torch.cat(logps), torch.cat(sums)


class LogpsModule(torch.nn.Module):
    """A causal LM whose forward returns per-sequence log-probs (as a tuple of tensors). Under FSDP2
    it is the root that is sharded, so the embedding and output weights are gathered for one call."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(
        self, input_ids, attention_mask, position_ids, src, target, seq, n: int, pieces=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = _logps(self.lm, input_ids, attention_mask, position_ids, src, target, seq, n, pieces)
        return out.logps, out.num_tokens, out.logits_sum

    def get_decoder(self) -> torch.nn.Module:
        return self.lm.get_decoder()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm.get_output_embeddings()

    @property
    def config(self):
        return self.lm.config


def batch_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], n: int) -> SequenceLogps:
    """Log-probs of the ``n`` output sequences of a batch from :mod:`criteriapo.rows.packing`,
    padded (``attention_mask``) or packed (``segment``, ``branch``, ``position_ids``); with
    ``canon`` (n,), output sequence k is the computed sequence ``canon[k]``.

    A packed batch on an SDPA model is computed by piece (:mod:`criteriapo.models.attention`; the
    model is set to it on the first such batch): only the blocks its mask allows. The mask goes with
    the pieces all the same, so a forward that does not pass the pieces on is still exact."""
    extra = {}
    if "segment" in batch:
        if use_pieces(model):
            extra["pieces"] = attention_pieces(batch["segment"], batch["branch"])
        implementation = getattr(model.config, "_attn_implementation", None) or "eager"
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        mask = attention_mask(batch["segment"], batch["branch"], implementation, dtype)
        position_ids = batch["position_ids"]
    else:
        mask, position_ids = batch["attention_mask"], None
    args = (batch["input_ids"], mask, position_ids, batch["src"], batch["target"], batch["seq"], n)
    if isinstance(model, LogpsModule):
        out = SequenceLogps(*model(*args, **extra))
    else:
        out = _logps(model, *args, **extra)
    if "canon" in batch:  # sequences computed once for several outputs (see collate_pairs)
        canon = batch["canon"]
        out = SequenceLogps(out.logps[canon], out.num_tokens[canon], out.logits_sum[canon])
    return out


def sequence_logps(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> SequenceLogps:
    """Sum of log p over each row's labelled tokens. ``labels`` (B, T) uses -100 for no label;
    the label at position t is predicted from positions < t (the shift is done here)."""
    shifted = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = shifted != -100
    rows, cols = torch.nonzero(keep, as_tuple=True)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "src": rows * input_ids.shape[1] + cols,
        "target": shifted[keep],
        "seq": rows,
    }
    return batch_logps(model, batch, input_ids.shape[0])


def _logps(
    model, input_ids, attention_mask, position_ids, src, target, seq, n: int, pieces=None
) -> SequenceLogps:
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    extra = {} if pieces is None else {"pieces": pieces}
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **extra
    ).last_hidden_state  # (R, L, H)
    h = hidden.flatten(0, 1)[src]  # (n_labels, H): the states that predict the labels
    transform = _transform_of(model, head)
    lp, logit_sums = token_logps(h, head.weight, target, bias=head.bias, transform=transform)
    zeros = torch.zeros(n, dtype=torch.float32, device=input_ids.device)
    logps = zeros.index_add(0, seq, lp)
    num = torch.bincount(seq, minlength=n)
    sums = zeros.index_add(0, seq, logit_sums)
    return SequenceLogps(logps, num, sums)
