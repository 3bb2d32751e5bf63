"""Per-sequence log-probabilities of completion tokens, without building full-vocabulary logits.

Only positions that carry a label go through the output layer, in chunks; each chunk's logits are
recomputed in backward (activation checkpointing) instead of stored. Peak extra memory is one
chunk of (chunk_size, vocab) floats rather than (batch, length, vocab).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_TOKENS = 1024


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

    def forward(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = _sequence_logps(self.lm, input_ids, attention_mask, labels)
        return out.logps, out.num_tokens, out.logits_sum

    def get_decoder(self) -> torch.nn.Module:
        return self.lm.get_decoder()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm.get_output_embeddings()

    @property
    def config(self):
        return self.lm.config


def sequence_logps(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> SequenceLogps:
    """Sum of log p over each row's labelled tokens. ``labels`` (B, T) uses -100 for no label;
    the label at position t is predicted from positions < t (the shift is done here)."""
    if isinstance(model, LogpsModule):
        return SequenceLogps(*model(input_ids, attention_mask, labels))
    return _sequence_logps(model, input_ids, attention_mask, labels)


def _sequence_logps(model, input_ids, attention_mask, labels) -> SequenceLogps:
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    shifted = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    mask = shifted != -100
    rows = torch.nonzero(mask, as_tuple=True)[0]  # which sequence each labelled position belongs to
    h = hidden[:, :-1][mask]  # (n, H)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    lp, logit_sums = token_logps(h, head.weight, shifted[mask], softcap=softcap)
    if head.bias is not None:
        raise NotImplementedError("output layers with a bias are not supported")
    b = input_ids.shape[0]
    zeros = torch.zeros(b, dtype=torch.float32, device=input_ids.device)
    logps = zeros.index_add(0, rows, lp)
    num = torch.bincount(rows, minlength=b)
    sums = zeros.index_add(0, rows, logit_sums)
    return SequenceLogps(logps, num, sums)
