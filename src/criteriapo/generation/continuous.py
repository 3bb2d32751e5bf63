"""Replies generated together one token at a time, where new prompts join the running batch
between steps and finished replies leave it, so that a server's batch stays full while requests
keep coming (continuous batching). Each reply keeps its own sampling settings, seed, limit and stop
strings; its text streams as it settles (:class:`~criteriapo.generation.replies.ReplyText`).

The batch's keys and values are one cache, left-padded to its longest row; a joining prompt is
computed apart from the batch (its prefill), then padded and stacked onto the batch; a leaving row
is cut out, and padding no row needs any more is trimmed. Keys and values depend only on the tokens
before them, so a prompt that starts with the batch's shared prefix (the tokens a chat template
renders before any user text, checked token by token) is computed from the prefix's cached keys
and values on: only its own tokens are new. Its padding then sits between the prefix and the rest,
where the mask hides it and positions (cumsum(mask) - 1) skip it. Models whose cache is not a plain
per-layer key/value cache (sliding windows, state-space layers) cannot join this way:
:func:`supported` says so, and :func:`~criteriapo.generation.batch.generate_batch` serves them
instead.

That is :class:`RunningBatch`. An SDPA model is served by :class:`FusedBatch` instead, which keeps
each row's keys and values unpadded (:mod:`criteriapo.generation.ragged`) and computes a joining
prompt in the same forward pass as the running replies' next tokens, so the batch does not wait for
it; :func:`batch_maker` checks once, against the model's own forward, that its logits agree
(:func:`fused_agrees`), and uses :class:`RunningBatch` for a model where they do not."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from criteriapo.generation.batch import eos_ids, left_padded, prompt_ids
from criteriapo.generation.options import Sampling
from criteriapo.generation.replies import Reply, ReplyText
from criteriapo.generation.sampler import draw_rows

log = logging.getLogger(__name__)


def supported(model: Any) -> bool:
    """Whether the model's cache is one plain key/value tensor pair per layer."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=model.config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def template_prefix(tokenizer: Any) -> list[int]:
    """The token ids the tokenizer's chat template renders before a user's text in a conversation
    that opens with it (SmolLM2's: its default system prompt and the user's header): the common
    start of two rendered one-message conversations. Empty without a chat template or where the
    template refuses a lone user message."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    try:
        a, b = (prompt_ids(tokenizer, [{"role": "user", "content": text}]) for text in ("A", "Z"))
    except Exception:  # noqa: BLE001 - the template's own errors (jinja's): no prefix to share
        return []
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return a[:same]


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


class _Replies:
    """What both kinds of running batch share: the model, its ends of turn and repetition penalty, the
    shared prefix, and each row's sampling and text. ``prefix``: the token ids whose keys and values
    joining prompts that start with them share (computed once, on first use); by default the chat
    template's (:func:`template_prefix`), ``()`` for none."""

    def __init__(self, model: Any, tokenizer: Any, prefix: Sequence[int] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.eos = eos_ids(model, tokenizer)
        penalty = getattr(getattr(model, "generation_config", None), "repetition_penalty", None)
        self.penalty = (
            penalty if penalty not in (None, 1.0) else None
        )  # the model's own, as generate applies it
        self.prefix = list(template_prefix(tokenizer) if prefix is None else prefix)
        self._prefix_kv: list[tuple[Any, Any]] | None = None  # per layer: keys, values (1, H, P, D)
        self.rows: list[_Row] = []

    def __len__(self) -> int:
        return len(self.rows)

    # -- shared internals ---------------------------------------------------------------------------
    def _row(self, r: Request) -> _Row:
        import torch

        g = None if r.sampling.greedy else torch.Generator(self.model.device).manual_seed(r.sampling.seed)
        text = ReplyText(self.tokenizer, self.eos, r.sampling.stop, r.sampling.max_new_tokens)
        return _Row(r, text, list(r.prompt_ids), g)

    def _starts_with_prefix(self, ids: list[int]) -> bool:
        """Whether the prompt is the prefix and more (the last prompt token gives the first logits)."""
        n = len(self.prefix)
        return 0 < n < len(ids) and ids[:n] == self.prefix

    def _forward(self, ids: Any, mask: Any, cache: Any) -> Any:
        """The next-token logits (B, V) after ``ids`` (B, T), whose keys and values join ``cache``;
        ``mask`` (B, past + T) marks the real tokens of both, and positions count only those."""
        import torch

        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, mask.shape[1] - ids.shape[1] :]
        with torch.inference_mode():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1]

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _advance(self, rows: list[_Row], logits: Any) -> list[tuple[Any, Reply]]:
        """Each row's next token from its logits (all rows' drawn at once): fed to its text, which
        may end it."""
        scores = logits.float()
        if self.penalty is not None:
            scores = self._penalized(rows, scores)
        tokens = draw_rows(scores, [row.request.sampling for row in rows], [row.generator for row in rows])
        finished = []
        for row, token in zip(rows, tokens.tolist(), strict=True):
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

    def _penalized(self, rows: list[_Row], scores: Any) -> Any:
        """The model's repetition penalty on each row's tokens so far, as ``generate`` applies it;
        rows padded with their own first token, which repeats a token already counted."""
        import torch
        from transformers import RepetitionPenaltyLogitsProcessor

        width = max(len(row.ids) for row in rows)
        seen = torch.tensor(
            [row.ids + row.ids[:1] * (width - len(row.ids)) for row in rows], device=scores.device
        )
        return RepetitionPenaltyLogitsProcessor(self.penalty)(seen, scores)

    def _prefix_values(self) -> list[tuple[Any, Any]]:
        """Per layer, the prefix's keys and values (1, H, P, D), computed on the first call."""
        import torch

        if self._prefix_kv is None:
            ids = torch.tensor([self.prefix], device=self.model.device)
            cache = self._new_cache()
            self._forward(ids, torch.ones_like(ids), cache)
            self._prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
        return self._prefix_kv


class RunningBatch(_Replies):
    """The running replies of a model whose cache is :func:`supported`, in one left-padded cache;
    joining prompts are computed apart from the batch (see the module's docstring)."""

    def __init__(self, model: Any, tokenizer: Any, prefix: Sequence[int] | None = None):
        super().__init__(model, tokenizer, prefix)
        self.cache: Any = None
        self.mask: Any = None  # (B, T): which cached positions are real tokens

    def add(self, requests: Sequence[Request]) -> list[tuple[Any, Reply]]:
        """Compute the requests' prompts together and draw each one's first token; those not finished
        by it join the batch. Returns the replies that ended at once.

        A prompt that starts with the shared prefix is computed from the prefix's keys and values
        on; the others are computed whole, in the same forward pass, the prefix's columns masked out
        for them (one pass over the weights for all joining prompts)."""
        import torch

        rows = [self._row(r) for r in requests]
        shared = [self._starts_with_prefix(r.prompt_ids) for r in requests]
        skip = len(self.prefix) if any(shared) else 0
        rests = [r.prompt_ids[skip:] if s else r.prompt_ids for r, s in zip(requests, shared, strict=True)]
        enc = left_padded(self.tokenizer, rests, self.model.device)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if skip:  # (n, P + T): the prefix (masked where a prompt lacks it), the padding, the rest
            cache = self._prefix_cache(len(rows))
            past = torch.tensor(shared, dtype=mask.dtype, device=mask.device)[:, None].expand(-1, skip)
            mask = torch.cat([past, mask], dim=1)
        else:
            cache = self._new_cache()
        finished = self._advance(rows, self._forward(ids, mask, cache))
        keep = [i for i, row in enumerate(rows) if not row.done]
        if keep:
            index = torch.tensor(keep, device=mask.device)
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
        ids = torch.tensor([[row.last] for row in self.rows], device=device)
        logits = self._forward(ids, mask, self.cache)
        self.mask = mask
        finished = self._advance(self.rows, logits)
        if finished:
            self._leave()
        return finished

    # -- internals ---------------------------------------------------------------------------------
    def _prefix_cache(self, n: int) -> Any:
        """A cache holding the prefix's keys and values ``n`` times."""
        import torch

        cache = self._new_cache()
        with torch.inference_mode():
            for i, (keys, values) in enumerate(self._prefix_values()):  # update copies: the prefix stays
                cache.update(keys.expand(n, -1, -1, -1), values.expand(n, -1, -1, -1), i)
        return cache

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


class FusedBatch(_Replies):
    """The running replies of an SDPA model whose cache is :func:`supported`, in a
    :class:`~criteriapo.generation.ragged.RaggedCache` of ``slots`` rows: a joining prompt waits
    (:meth:`add`) for the next :meth:`step`, whose one forward pass computes it together with the
    running replies' next tokens; rows stay in slots ``0..n-1`` (a leaving row's slot takes the last
    row's). Same replies as :class:`RunningBatch`, to float rounding."""

    def __init__(self, model: Any, tokenizer: Any, slots: int = 8, prefix: Sequence[int] | None = None):
        from criteriapo.generation.ragged import RaggedCache, use_ragged

        if not use_ragged(model):
            raise ValueError(f"a fused batch needs SDPA attention, not {model.config._attn_implementation!r}")
        super().__init__(model, tokenizer, prefix)
        self.cache = RaggedCache(slots)
        self.lengths: list[int] = []  # each running row's cached tokens
        self.joining: list[tuple[_Row, list[int], bool]] = []  # a row, its tokens to compute, on the prefix

    def __len__(self) -> int:
        return len(self.rows) + len(self.joining)

    def add(self, requests: Sequence[Request]) -> list[tuple[Any, Reply]]:
        """Queue the requests to join at the next step; nothing ends before it (returns [])."""
        if len(self) + len(requests) > self.cache.slots:
            raise ValueError(f"{len(self) + len(requests)} replies for a batch of {self.cache.slots}")
        for r in requests:
            shared = self._starts_with_prefix(r.prompt_ids)
            rest = r.prompt_ids[len(self.prefix) :] if shared else list(r.prompt_ids)
            self.joining.append((self._row(r), rest, shared))
        return []

    def step(self) -> list[tuple[Any, Reply]]:
        """One token for every running reply, and the first for every joining one; returns the
        replies that ended."""
        if not len(self):
            return []
        logits = self._forward_all()  # the joining rows are running rows after it
        finished = self._advance(self.rows, logits)
        if finished:
            self._leave()
        return finished

    def _forward_all(self) -> Any:
        """One forward of the running rows' last tokens and the joining prompts: their next-token
        logits (rows, V), running rows first; the joining rows are running after it."""
        import torch

        plan = self.cache.plan = self._plan()
        device = self.model.device
        ids = [row.last for row in self.rows] + [t for _, rest, _ in self.joining for t in rest]
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([ids], device=device),
                position_ids=torch.tensor([plan.positions()], device=device),
                attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device),  # unused: a plan
                cache=self.cache,
                use_cache=True,
                logits_to_keep=torch.tensor(plan.last(), device=device),
                ragged=plan,
            )
        plan.check(self.model.config.get_text_config().num_hidden_layers)
        self.lengths = [n + 1 for n in self.lengths] + [plan.past[r] + n for r, n in plan.joins]
        self.rows = self.rows + [row for row, _, _ in self.joining]
        self.joining = []
        return out.logits[0]

    def _plan(self) -> Any:
        from criteriapo.generation.ragged import Plan

        n = len(self.rows)
        self.cache.prefix = self._prefix_values() if any(s for _, _, s in self.joining) else []
        past = self.lengths + [len(self.prefix) if shared else 0 for _, _, shared in self.joining]
        joins = [(n + i, len(rest)) for i, (_, rest, _) in enumerate(self.joining)]
        on_prefix = [n + i for i, (_, _, shared) in enumerate(self.joining) if shared]
        return Plan(decode=n, joins=joins, past=past, prefix=on_prefix)

    def _leave(self) -> None:
        """Drop the finished rows; the last running rows move into their slots."""
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        holes = [i for i in range(len(keep)) if self.rows[i].done]
        movers = [i for i in keep if i >= len(keep)]
        for hole, mover in zip(holes, movers, strict=True):
            self.cache.move(mover, hole, self.lengths[mover])
            self.rows[hole], self.lengths[hole] = self.rows[mover], self.lengths[mover]
        self.rows, self.lengths = self.rows[: len(keep)], self.lengths[: len(keep)]
        if not self.rows:  # an idle batch holds no memory (a long reply may have grown its slots)
            self.cache.keys, self.cache.values = [], []


def batch_maker(model: Any, tokenizer: Any, slots: int) -> Callable[[], RunningBatch | FusedBatch]:
    """What makes the batches that serve ``model``: fused (:class:`FusedBatch`) where its attention
    is SDPA and :func:`fused_agrees` with its own forward (checked once, now), else
    :class:`RunningBatch`."""
    from criteriapo.generation.ragged import use_ragged

    if use_ragged(model) and fused_agrees(model, tokenizer):
        return lambda: FusedBatch(model, tokenizer, slots)
    return lambda: RunningBatch(model, tokenizer)


def fused_agrees(model: Any, tokenizer: Any) -> bool:
    """Whether a fused batch's logits are the model's own forward's, to the rounding of its dtype,
    over three forwards: a prompt joining alone; its next token beside a second prompt joining; both
    rows' next tokens (rows of different lengths), each row against its sequence computed whole.
    False (and why, logged) for a model whose forward does not run it."""
    import torch

    batch = FusedBatch(model, tokenizer, 2, prefix=())
    sequences: list[list[int]] = []
    got, want = [], []
    try:
        for joining in ([list(range(10, 17))], [list(range(20, 24))], []):
            for i, row in enumerate(batch.rows):  # each running row goes on with its most likely token
                row.last = int(got[-1][i].argmax())
                sequences[i] = [*sequences[i], row.last]
            batch.add([Request(ids, Sampling()) for ids in joining])
            sequences += joining
            got.append(batch._forward_all().float())
            with torch.inference_mode():
                whole = [
                    model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1]
                    for ids in sequences
                ]
            want.append(torch.stack(whole).float())
    except Exception as e:  # noqa: BLE001 - any failure of this model on the fused path: not used
        log.info("fused batching is off for this model (%s: %s)", type(e).__name__, e)
        return False
    got_all, want_all = torch.cat(got), torch.cat(want)
    tolerance = max(1e-3, 50 * torch.finfo(model.dtype).eps) * (1 + float(want_all.abs().max()))
    error = float((got_all - want_all).abs().max())
    if error > tolerance:
        log.warning(
            "fused batching is off: its logits differ from the model's by %.3g (> %.3g)", error, tolerance
        )
    return error <= tolerance


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
