"""Per-sequence log-probabilities of completion tokens, without building full-vocabulary logits.

Only positions that carry a label go through the output layer, in chunks; each chunk's logits are
recomputed in backward (activation checkpointing) instead of stored. Peak extra memory is one
chunk of (chunk_size, vocab) floats rather than (batch, length, vocab).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from criteriapo.train.packing import attention_mask

CHUNK_TOKENS = 256  # a (256, 128k) chunk of float32 logits is 128 MiB


@dataclass
class SequenceLogps:
    logps: torch.Tensor  # (N,) sum of log p(label) over each sequence's labelled tokens
    num_tokens: torch.Tensor  # (N,) labelled tokens per sequence
    logits_sum: torch.Tensor  # (N,) sum over labelled positions and vocabulary of the logits (detached)


def _chunk_logps(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = (hidden @ weight.T).float()  # (n, H) @ (H, V) -> (n, V)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logp = logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (n,)
    return logp, logits.detach().sum(-1)


def token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    softcap: float | None = None,
    chunk: int = CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label) at each of ``hidden``'s positions (n, H), and the sum of each position's logits."""
    logps, sums = [], []
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start : start + chunk], labels[start : start + chunk]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            lp, s = checkpoint(_chunk_logps, h, weight, y, softcap, use_reentrant=False)
        else:
            lp, s = _chunk_logps(h, weight, y, softcap)
        logps.append(lp)
        sums.append(s)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(sums)


class LogpsModule(torch.nn.Module):
    """A causal LM whose forward returns per-sequence log-probs (as a tuple of tensors). Under FSDP2
    it is the root that is sharded, so the embedding and output weights are gathered for one call."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(
        self, input_ids, attention_mask, position_ids, src, target, seq, n: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = _logps(self.lm, input_ids, attention_mask, position_ids, src, target, seq, n)
        return out.logps, out.num_tokens, out.logits_sum

    def get_decoder(self) -> torch.nn.Module:
        return self.lm.get_decoder()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm.get_output_embeddings()

    @property
    def config(self):
        return self.lm.config


def batch_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], n: int) -> SequenceLogps:
    """Log-probs of the ``n`` output sequences of a batch from :mod:`criteriapo.train.packing`,
    padded (``attention_mask``) or packed (``segment``, ``branch``, ``position_ids``)."""
    if "segment" in batch:
        implementation = getattr(model.config, "_attn_implementation", None) or "eager"
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        mask = attention_mask(batch["segment"], batch["branch"], implementation, dtype)
        position_ids = batch["position_ids"]
    else:
        mask, position_ids = batch["attention_mask"], None
    args = (batch["input_ids"], mask, position_ids, batch["src"], batch["target"], batch["seq"], n)
    if isinstance(model, LogpsModule):
        return SequenceLogps(*model(*args))
    return _logps(model, *args)


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


def _logps(model, input_ids, attention_mask, position_ids, src, target, seq, n: int) -> SequenceLogps:
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    if head.bias is not None:
        raise NotImplementedError("output layers with a bias are not supported")
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state  # (R, L, H)
    h = hidden.flatten(0, 1)[src]  # (n_labels, H): the states that predict the labels
    softcap = getattr(model.config, "final_logit_softcapping", None)
    lp, logit_sums = token_logps(h, head.weight, target, softcap=softcap)
    zeros = torch.zeros(n, dtype=torch.float32, device=input_ids.device)
    logps = zeros.index_add(0, seq, lp)
    num = torch.bincount(seq, minlength=n)
    sums = zeros.index_add(0, seq, logit_sums)
    return SequenceLogps(logps, num, sums)
