"""A running batch's keys and values kept row by row without padding, and the attention that reads
them, so that one forward pass takes every running reply's next token and every joining prompt's
tokens together (a ragged batch).

The forward's input is one sequence (batch 1) of the new tokens, in the order of a :class:`Plan`:
one token for each of the running rows 0..n-1, then each joining row's prompt tokens. The weights
are read once for all of them: a joining prompt's tokens cost the matrix products of a few more
rows instead of a forward of their own while the batch waits.

:class:`RaggedCache` keeps each layer's keys and values in slots (S, H, C, D): row r's tokens are
``[0, length r)`` of slot r, appended in place (the whole cache is not copied at each token, as a
concatenating cache does), and grown by doubling. Attention (:func:`ragged_attention`, registered
with transformers as :data:`RAGGED`) runs the running rows' one-token queries together against their
slots, masked at each row's length, and each joining prompt causally against its own slot (after the
keys already there: a shared prefix copied in). Without a plan it is transformers' SDPA attention, so
a model set to it generates as before everywhere else.

A model whose attention does not reach this function with the plan (its forward drops the keyword
arguments) would compute nonsense from the slots: every forward counts the layers that ran on the
plan, and :meth:`Plan.check` raises when one did not."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

RAGGED = "criteriapo_ragged"
# what SDPA-based attention can be asked to do that ragged attention does not
_UNSUPPORTED = ("softcap", "sliding_window", "s_aux", "position_bias")


@dataclass
class Plan:
    """One forward's tokens: one token for each of the rows ``0..decode-1``, then ``joins``: (row,
    number of tokens) for each joining row, in order. ``past``: each row's tokens already cached
    before this forward (a joining row's: the shared prefix copied in, or 0); ``prefix``: the rows
    whose slot gets the shared prefix's keys and values first."""

    decode: int
    joins: list[tuple[int, int]]
    past: list[int]
    prefix: list[int] = field(default_factory=list)
    layers: int = 0  # the attention layers that ran on this plan

    @property
    def width(self) -> int:
        """The slots' length this forward needs."""
        ends = [self.past[r] + 1 for r in range(self.decode)] + [self.past[r] + n for r, n in self.joins]
        return max(ends)

    def positions(self) -> list[int]:
        """Each new token's position in its row."""
        out = self.past[: self.decode]
        for row, n in self.joins:
            out = out + list(range(self.past[row], self.past[row] + n))
        return out

    def last(self) -> list[int]:
        """The index of each row's last new token in the forward's sequence (whose logits draw its
        next token), rows in the plan's order."""
        out, at = list(range(self.decode)), self.decode
        for _, n in self.joins:
            at += n
            out.append(at - 1)
        return out

    def check(self, layers: int) -> None:
        if self.layers != layers:
            raise RuntimeError(
                f"{self.layers} of the model's {layers} attention layers ran on the ragged batch: its "
                "forward does not pass keyword arguments to its attention; serve it with --max-batch 1"
            )


class RaggedCache:
    """Per layer, keys and values in slots (S, H, C, D) (see the module's docstring), allocated on
    the first forward with the model's own heads, head size and dtype. ``plan``: the forward about to
    run; ``prefix``: per layer, the shared prefix's keys and values (1, H, P, D)."""

    def __init__(self, slots: int):
        self.slots = slots
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self.plan: Plan | None = None
        self.prefix: list[tuple[Any, Any]] = []

    def update(self, keys: Any, values: Any, layer: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """Write the forward's new keys and values (1, H, T, D) into their rows' slots; returns the
        layer's slots."""
        plan = self.plan
        assert plan is not None and keys.shape[0] == 1, "a ragged cache runs only on a plan"
        if layer == len(self.keys):
            self.keys.append(keys.new_empty(self.slots, keys.shape[1], 0, keys.shape[3]))
            self.values.append(values.new_empty(self.slots, values.shape[1], 0, values.shape[3]))
        self._reserve(layer, plan.width)
        k, v = self.keys[layer], self.values[layer]
        for row in plan.prefix:
            pk, pv = self.prefix[layer]
            k[row, :, : pk.shape[2]], v[row, :, : pv.shape[2]] = pk[0], pv[0]
        n = plan.decode
        if n:
            rows = torch.arange(n, device=k.device)
            at = torch.tensor(plan.past[:n], device=k.device)
            k[rows, :, at], v[rows, :, at] = keys[0, :, :n].transpose(0, 1), values[0, :, :n].transpose(0, 1)
        start = n
        for row, count in plan.joins:
            p = plan.past[row]
            k[row, :, p : p + count] = keys[0, :, start : start + count]
            v[row, :, p : p + count] = values[0, :, start : start + count]
            start += count
        return k, v

    def move(self, source: int, target: int, length: int) -> None:
        """Copy row ``source``'s first ``length`` tokens into slot ``target``."""
        with torch.inference_mode():  # the slots are inference tensors
            for k, v in zip(self.keys, self.values, strict=True):
                k[target, :, :length] = k[source, :, :length]
                v[target, :, :length] = v[source, :, :length]

    def _reserve(self, layer: int, width: int) -> None:
        """Grow the layer's slots (doubling) to hold ``width`` tokens."""
        k = self.keys[layer]
        if k.shape[2] >= width:
            return
        size = max(width, 2 * k.shape[2], 64)
        for store in (self.keys, self.values):
            old = store[layer]
            grown = old.new_zeros(old.shape[0], old.shape[1], size, old.shape[3])
            grown[:, :, : old.shape[2]] = old
            store[layer] = grown


def ragged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    ragged: Plan | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface. With ``ragged``: query (1, Hq, T, D) of the plan's tokens,
    key/value the layer's slots (S, Hkv, C, D) -> (1, T, Hq, D). Without it, transformers' SDPA."""
    if ragged is None:
        options = {"dropout": dropout, "scaling": scaling, **kwargs}
        return sdpa_attention_forward(module, query, key, value, attention_mask, **options)
    asked = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
    if asked:
        raise RuntimeError(f"ragged attention cannot apply {asked}; serve this model with --max-batch 1")
    options = {"scale": scaling, "enable_gqa": query.shape[1] != key.shape[1]}
    parts, n = [], ragged.decode
    if n:
        lengths = torch.tensor(ragged.past[:n], device=key.device) + 1
        width = int(lengths.max())
        q = query[0, :, :n].transpose(0, 1).unsqueeze(2)  # (n, Hq, 1, D)
        mask = None
        if int(lengths.min()) < width:
            mask = (torch.arange(width, device=key.device) < lengths[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q, key[:n, :, :width], value[:n, :, :width], mask, **options)
        parts.append(out.transpose(1, 2).transpose(0, 1))  # (1, n, Hq, D)
    start = n
    for row, count in ragged.joins:
        p = ragged.past[row]
        q, k, v = query[:, :, start : start + count], key[row : row + 1, :, : p + count], value[row : row + 1]
        v = v[:, :, : p + count]
        if p:
            out = F.scaled_dot_product_attention(q, k, v, causal_lower_right(count, p + count), **options)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **options)
        parts.append(out.transpose(1, 2))
        start += count
    ragged.layers += 1
    return torch.cat(parts, dim=1).contiguous(), None


AttentionInterface.register(RAGGED, ragged_attention)
AttentionMaskInterface.register(RAGGED, sdpa_mask)


def use_ragged(model: torch.nn.Module) -> bool:
    """Set an SDPA ``model`` to :data:`RAGGED` (SDPA for every forward without a plan); True when it
    uses it (set now or before). Any other attention is left as it is."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation == RAGGED:
        return True
    if implementation != "sdpa" or not isinstance(model, PreTrainedModel):
        return False
    model.set_attn_implementation(RAGGED)
    return getattr(model.config, "_attn_implementation", None) == RAGGED
