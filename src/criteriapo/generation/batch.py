"""Replies to many conversations at once, in left-padded batches, on ``model.generate``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from criteriapo.data.records import Message
from criteriapo.generation.options import GREEDY, Sampling
from criteriapo.generation.replies import Reply, ReplyText
from criteriapo.generation.sampler import RowSampler, Sampler

OnText = Callable[[int, str], None]  # (reply index, new text)
Prompt = list[Message] | list[int]  # a conversation (rendered by the chat template), or token ids


def chat_messages(prompt: str, system: str | None = None) -> list[Message]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end a turn: the model's generation config's and the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    sampling: Sampling | Sequence[Sampling] = GREEDY,
    *,
    samples: int = 1,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
    on_text: OnText | None = None,
    interrupt: threading.Event | Sequence[threading.Event] | None = None,
) -> list[Reply]:
    """``samples`` replies per prompt (prompt-major: all of the first's, then the second's, ...),
    generated in left-padded batches of about ``batch_size`` sequences; the same seed gives the same
    replies. A prompt is a conversation (rendered by the tokenizer's chat template) or token ids.

    ``sampling``: one setting for all, drawn by :class:`~.sampler.Sampler` with a generator of the
    batch's own (seeded ``sampling.seed`` plus the batch's first prompt index), never the process's;
    or one per prompt (one sample each), each drawn with its own seed (:class:`~.sampler.RowSampler`)
    and ended at its own ``max_new_tokens`` and stop strings.

    ``progress(n)`` is told of each ``n`` prompts answered; ``on_text(i, piece)`` of each settled
    piece of reply ``i`` as it is generated; setting ``interrupt`` (from another thread; one event
    for all, or one per prompt) ends those replies after the current token, as ``interrupted``.

    With several samples, each prompt is computed once and its keys and values copied to its
    samples (:func:`_prefilled`) instead of computing the same prompt ``samples`` times."""
    import torch
    from transformers import StoppingCriteriaList

    per_row = not isinstance(sampling, Sampling)
    if per_row and (samples != 1 or len(sampling) != len(prompts)):
        raise ValueError("sampling per prompt takes one setting per prompt and one sample each")
    eos = eos_ids(model, tokenizer)
    per_batch = max(1, batch_size // samples)  # prompts per batch
    out: list[Reply] = []
    for start in range(0, len(prompts), per_batch):
        chunk = prompts[start : start + per_batch]
        rows = list(sampling[start : start + per_batch]) if per_row else [sampling] * (len(chunk) * samples)
        enc = left_padded(tokenizer, chunk, model.device)
        settings = _settings(sampling if not per_row else rows, start, model.device)
        first = len(out)
        watch = _Watch([ReplyText(tokenizer, eos, r.stop, r.max_new_tokens) for r in rows])
        watch.on_text = None if on_text is None else lambda i, piece, first=first: on_text(first + i, piece)
        watch.interrupts = _events(interrupt, start, len(watch.rows))
        with torch.inference_mode():
            inputs = _prefilled(model, enc, samples) if samples > 1 else dict(enc)
            model.generate(
                **inputs,
                max_new_tokens=max(r.max_new_tokens for r in rows),
                pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([watch]),
                **settings,
            )
        out.extend(watch.finish())
        if progress is not None:
            progress(len(chunk))
        if isinstance(interrupt, threading.Event) and interrupt.is_set():
            break
    return out


def _settings(sampling: Sampling | list[Sampling], start: int, device: Any) -> dict[str, Any]:
    """``generate``'s sampling arguments: greedy, or our sampler for the whole batch (one setting,
    its generator seeded with the seed plus ``start``) or for each row (its own setting and seed)."""
    import torch
    from transformers import LogitsProcessorList

    settings: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if isinstance(sampling, list) and not all(r.greedy for r in sampling):
        settings["logits_processor"] = LogitsProcessorList([RowSampler(sampling, device)])
    elif isinstance(sampling, Sampling) and not sampling.greedy:
        g = torch.Generator(device).manual_seed(sampling.seed + start)
        sampler = Sampler(sampling.temperature, sampling.top_k, sampling.top_p, g)
        settings["logits_processor"] = LogitsProcessorList([sampler])
    return settings


def _events(
    interrupt: threading.Event | Sequence[threading.Event] | None, start: int, n: int
) -> list[threading.Event | None]:
    """Each row's interrupt: one event for all, or the rows' own (one per prompt, one sample each)."""
    if interrupt is None or isinstance(interrupt, threading.Event):
        return [interrupt] * n
    return list(interrupt[start : start + n])


class _Watch:
    """``generate``'s stopping criterion that follows every row's new token: each row's text grows
    in its :class:`ReplyText`, which ends the row at the end of turn, a stop string or its limit."""

    def __init__(self, rows: list[ReplyText]):
        self.rows = rows
        self.on_text: OnText | None = None
        self.interrupts: list[threading.Event | None] = [None] * len(rows)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        for i, (row, token) in enumerate(zip(self.rows, input_ids[:, -1].tolist(), strict=True)):
            piece = row.add(token)
            if piece and self.on_text is not None:
                self.on_text(i, piece)
        for row, event in zip(self.rows, self.interrupts, strict=True):
            if event is not None and event.is_set() and row.finish is None:
                row.end("interrupted")
        done = [row.finish is not None for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def finish(self) -> list[Reply]:
        replies = []
        for i, row in enumerate(self.rows):
            if row.finish is None:  # generate stopped before the row's own end: it was interrupted
                piece = row.end("interrupted")
                if piece and self.on_text is not None:
                    self.on_text(i, piece)
            replies.append(row.reply())
        return replies


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """A prompt's token ids: a conversation rendered by the chat template, ready for the reply."""
    if prompt and isinstance(prompt[0], dict):
        return list(
            tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    return list(prompt)


def left_padded(tokenizer: Any, prompts: Sequence[Prompt], device: Any) -> dict:
    """The prompts' ids padded on the left (where generation needs the padding), without touching the
    tokenizer's own padding side."""
    import torch

    rows = [prompt_ids(tokenizer, p) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _prefilled(model: Any, enc: Any, samples: int) -> dict:
    """``generate``'s inputs for ``samples`` replies per prompt: every prompt but its last token run
    once into a cache, the cache and the prompts repeated ``samples`` times; ``generate`` then
    computes only the last prompt token onwards. Positions count from each prompt's first real
    token, as ``generate`` counts them under left padding."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    ids, mask = enc["input_ids"], enc["attention_mask"]
    repeated = {
        "input_ids": ids.repeat_interleave(samples, dim=0),
        "attention_mask": mask.repeat_interleave(samples, dim=0),
    }
    cache = DynamicCache(config=model.config)
    if any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers):
        return repeated  # state-space or linear-attention layers: their state is not copied here
    if ids.shape[1] > 1:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, :-1]  # (P, T-1)
        model(
            input_ids=ids[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache.batch_repeat_interleave(samples)
    return repeated | {"cache": cache}


def generate(model: Any, tokenizer: Any, messages: list[Message], sampling: Sampling = GREEDY) -> str:
    """The reply to one conversation."""
    return generate_batch(model, tokenizer, [messages], sampling)[0].text


def sample_batch(
    model: Any, tokenizer: Any, conversations: list[list[Message]], sampling: Sampling, **kw: Any
) -> list[str]:
    """The texts of :func:`generate_batch`."""
    return [r.text for r in generate_batch(model, tokenizer, conversations, sampling, **kw)]
