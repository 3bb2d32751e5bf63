"""Replies generated together one token at a time, where new prompts join the running batch
between steps and finished replies leave it, so that a server's batch stays full while requests
keep coming (continuous batching). Each reply keeps its own sampling settings, seed, limit and stop
strings; its text streams as it settles (:class:`~criteriapo.generation.replies.ReplyText`).

The batch's keys and values are one cache, left-padded to its longest row; a joining prompt is
computed alone (its prefill), then padded and stacked onto the batch; a leaving row is cut out, and
padding no row needs any more is trimmed. Models whose cache is not a plain per-layer key/value
cache (sliding windows, state-space layers) cannot join this way: :func:`supported` says so, and
:func:`~criteriapo.generation.batch.generate_batch` serves them instead."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from criteriapo.generation.batch import eos_ids, left_padded
from criteriapo.generation.options import Sampling
from criteriapo.generation.replies import Reply, ReplyText
from criteriapo.generation.sampler import draw


def supported(model: Any) -> bool:
    """Whether the model's cache is one plain key/value tensor pair per layer."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=model.config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


@dataclass
class Request:
    """One reply to make: the prompt's token ids, its settings, where its text goes as it settles,
    and an event that stops it (``interrupted``); ``key`` is the caller's, handed back with the reply."""

    prompt_ids: list[int]
    sampling: Sampling
    key: Any = None
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event | None = None


@dataclass
class _Row:
    request: Request
    text: ReplyText
    ids: list[int]  # prompt and reply so far (for a repetition penalty)
    generator: Any = None
    last: int = 0  # the token to feed next
    done: bool = field(default=False)


class RunningBatch:
    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        self.eos = eos_ids(model, tokenizer)
        penalty = getattr(getattr(model, "generation_config", None), "repetition_penalty", None)
        self.penalty = (
            penalty if penalty not in (None, 1.0) else None
        )  # the model's own, as generate applies it
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: Any = None  # (B, T): which cached positions are real tokens

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, requests: Sequence[Request]) -> list[tuple[Any, Reply]]:
        """Compute the requests' prompts and draw each one's first token; those not finished by it join
        the batch. Returns the replies that ended at once."""
        import torch
        from transformers import DynamicCache

        device = self.model.device
        enc = left_padded(self.tokenizer, [r.prompt_ids for r in requests], device)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        rows = [self._row(r) for r in requests]
        finished = self._advance(rows, out.logits[:, -1])
        keep = [i for i, row in enumerate(rows) if not row.done]
        if keep:
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            self._join(cache, mask[index], [rows[i] for i in keep])
        return finished

    def step(self) -> list[tuple[Any, Reply]]:
        """One token for every running reply; returns those that ended."""
        import torch

        if not self.rows:
            return []
        device = self.model.device
        mask = torch.cat(
            [self.mask, torch.ones(len(self.rows), 1, dtype=self.mask.dtype, device=device)], dim=1
        )
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([[row.last] for row in self.rows], device=device),
                attention_mask=mask,
                position_ids=(mask.sum(-1, keepdim=True) - 1),
                cache=self.cache,
                use_cache=True,
            )
        self.mask = mask
        finished = self._advance(self.rows, out.logits[:, -1])
        if finished:
            self._leave()
        return finished

    # -- internals ---------------------------------------------------------------------------------
    def _row(self, r: Request) -> _Row:
        import torch

        g = None if r.sampling.greedy else torch.Generator(self.model.device).manual_seed(r.sampling.seed)
        text = ReplyText(self.tokenizer, self.eos, r.sampling.stop, r.sampling.max_new_tokens)
        return _Row(r, text, list(r.prompt_ids), g)

    def _advance(self, rows: list[_Row], logits: Any) -> list[tuple[Any, Reply]]:
        """Each row's next token from its logits: fed to its text, which may end it."""
        finished = []
        for row, scores in zip(rows, logits.float(), strict=True):
            token = self._draw(row, scores)
            row.ids.append(token)
            row.last = token
            piece = row.text.add(token)
            cancel = row.request.cancel
            if cancel is not None and cancel.is_set() and row.text.finish is None:
                piece += row.text.end("interrupted")
            if piece and row.request.on_text is not None:
                row.request.on_text(piece)
            if row.text.finish is not None:
                row.done = True
                finished.append((row.request.key, row.text.reply()))
        return finished

    def _draw(self, row: _Row, scores: Any) -> int:
        if self.penalty is not None:
            import torch
            from transformers import RepetitionPenaltyLogitsProcessor

            seen = torch.tensor([row.ids], device=scores.device)
            scores = RepetitionPenaltyLogitsProcessor(self.penalty)(seen, scores[None])[0]
        return draw(scores, row.request.sampling, row.generator)

    def _join(self, cache: Any, mask: Any, rows: list[_Row]) -> None:
        """Stack the new rows' cache and mask onto the batch's, both left-padded to the longer."""
        import torch

        if self.cache is None or not self.rows:
            self.cache, self.mask, self.rows = cache, mask, rows
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(mask, width)])
        self.rows = self.rows + rows

    def _leave(self) -> None:
        """Cut the finished rows out, then the padding columns no row needs."""
        import torch

        keep = [i for i, row in enumerate(self.rows) if not row.done]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        unused = int(self.mask.any(0).int().argmax())  # leading columns that are padding for every row
        if unused:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            self.mask = self.mask[:, unused:]


def _left_pad(kv: Any, width: int) -> Any:
    import torch

    missing = width - kv.shape[2]
    if not missing:
        return kv
    b, h, _, d = kv.shape
    return torch.cat([kv.new_zeros(b, h, missing, d), kv], dim=2)


def _left_pad_mask(mask: Any, width: int) -> Any:
    import torch

    missing = width - mask.shape[1]
    return mask if not missing else torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)
