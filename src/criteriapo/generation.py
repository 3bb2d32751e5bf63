"""Text generation from a chat model: one prompt in, the assistant's reply out."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from criteriapo.data.records import Message


def chat_messages(prompt: str, system: str | None = None) -> list[Message]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]


def generate(
    model: Any,
    tokenizer: Any,
    messages: list[Message],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    streamer: Any = None,
    stop: threading.Event | None = None,
) -> str:
    """The reply to ``messages``; greedy when ``temperature`` is 0, sampled (seeded) otherwise.
    Setting ``stop`` (from another thread) ends it after the current token."""
    return _generate_ids(
        model, tokenizer, messages, max_new_tokens, temperature, top_p, seed, streamer, stop
    )[0]


def _generate_ids(
    model: Any,
    tokenizer: Any,
    messages: list[Message],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    streamer: Any,
    stop: threading.Event | None,
) -> tuple[str, list[int]]:
    """The reply's text and its new token ids."""
    import torch
    from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if temperature > 0:  # drawn from a generator of this call's own: the process's seed is left alone
        g = torch.Generator(model.device).manual_seed(seed)
        top_k = getattr(model.generation_config, "top_k", None) or 50  # the model's own, as transformers'
        sampling["logits_processor"] = LogitsProcessorList([_Sampler(temperature, top_k, top_p, g)])
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_Stop()]) if stop is not None else None,
            **sampling,
        )
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    return tokenizer.decode(new, skip_special_tokens=True).strip(), new


@dataclass(frozen=True)
class StreamedReply:
    text: str
    cut_off: bool  # the token limit stopped it before the model ended its reply
    stopped: bool  # Ctrl-C stopped it


def stream_reply(
    model: Any,
    tokenizer: Any,
    messages: list[Message],
    on_text: Callable[[str], None],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> StreamedReply:
    """The reply to ``messages``, each piece of text handed to ``on_text`` as it comes. Ctrl-C
    (KeyboardInterrupt) while it is generated stops it after the current token and returns what was
    said, marked ``stopped``, instead of leaving a generating thread behind."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = threading.Event()
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["out"] = _generate_ids(
                model, tokenizer, messages, max_new_tokens, temperature, top_p, seed, streamer, stop
            )
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread, below
            result["error"] = e
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    parts: list[str] = []
    stopped = False
    try:
        for piece in streamer:
            parts.append(piece)
            on_text(piece)
    except KeyboardInterrupt:
        stopped = True
        stop.set()
    while thread.is_alive():
        try:
            thread.join()
        except KeyboardInterrupt:  # a second Ctrl-C while the current token finishes
            stop.set()
    if "error" in result:
        raise result["error"]
    text, ids = result.get("out", ("".join(parts).strip(), []))
    if stopped:
        text = "".join(parts).strip()
    eos = _eos_ids(model, tokenizer)
    cut_off = not stopped and len(ids) >= max_new_tokens and (not ids or ids[-1] not in eos)
    return StreamedReply(text, cut_off, stopped)


@dataclass(frozen=True)
class Reply:
    text: str
    cut_off: bool  # the token limit stopped it before the model ended its reply


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def generate_batch(
    model: Any,
    tokenizer: Any,
    conversations: list[list[Message]],
    *,
    samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    top_k: int = 50,
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[Reply]:
    """``samples`` replies per conversation (conversation-major: all of the first's, then the
    second's, ...), sampled in left-padded batches of about ``batch_size`` sequences; the same seed
    gives the same replies. A reply is cut off when none of its new tokens ends the turn. Greedy
    when ``temperature`` is 0; else sampled from the ``top_k`` most likely tokens (transformers'
    default 50), then the nucleus of mass ``top_p``, by :class:`_Sampler` with a generator of its own.
    ``progress(n)`` is told of each ``n`` conversations answered.

    With several samples, each prompt is computed once and its keys and values copied to its
    samples (:func:`_prefilled`) instead of computing the same prompt ``samples`` times."""
    import torch
    from transformers import LogitsProcessorList

    greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    eos = _eos_ids(model, tokenizer)
    per_batch = max(1, batch_size // samples)  # prompts per batch
    out: list[Reply] = []
    for start in range(0, len(conversations), per_batch):
        chunk = conversations[start : start + per_batch]
        enc = _left_padded(tokenizer, chunk, model.device)
        sampling = dict(greedy)
        if temperature > 0:
            g = torch.Generator(model.device).manual_seed(seed + start)
            sampling["logits_processor"] = LogitsProcessorList([_Sampler(temperature, top_k, top_p, g)])
        with torch.inference_mode():
            inputs = _prefilled(model, enc, samples) if samples > 1 else dict(enc)
            ids = model.generate(
                **inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
            )
        new = ids[:, enc["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for row, text in zip(new.tolist(), texts, strict=True):
            out.append(Reply(text.strip(), not any(t in eos for t in row)))
        if progress is not None:
            progress(len(chunk))
    return out


def _left_padded(tokenizer: Any, conversations: list[list[Message]], device: Any) -> dict:
    """The conversations' prompts, rendered by the chat template and padded on the left (where
    generation needs the padding), without touching the tokenizer's own padding side."""
    import torch

    rows = [
        list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
        for c in conversations
    ]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


class _Sampler:
    """Temperature, top-k, top-p, then one token per row drawn by the exponential race: the argmax
    of p_i / E_i with E_i ~ Exp(1) is distributed as the categorical p. It returns logits whose only
    finite entry is the drawn token, so greedy decoding emits it. The draw is the one transformers'
    sampling makes (temperature, then top-k, then top-p: a token is dropped when the more likely
    ones already hold ``top_p`` of the mass), but over the k kept tokens only: ``torch.multinomial``
    and the top-p sort over the whole vocabulary took a third of the sampling time on CPU."""

    def __init__(self, temperature: float, top_k: int, top_p: float, generator: Any):
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        logits = scores.float() / self.temperature
        k = min(self.top_k, logits.shape[-1]) if self.top_k else logits.shape[-1]
        top, index = logits.topk(k, dim=-1)  # (B, k), most likely first
        probs = top.softmax(-1)
        if self.top_p < 1.0:
            before = probs.cumsum(-1) - probs  # mass of the more likely tokens
            probs = probs.masked_fill(before >= self.top_p, 0.0)  # the most likely one always stays
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        drawn = index.gather(-1, (probs / race).argmax(-1, keepdim=True))  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter_(-1, drawn, 0.0)


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


def sample_batch(model: Any, tokenizer: Any, conversations: list[list[Message]], **kw: Any) -> list[str]:
    """The texts of :func:`generate_batch`."""
    return [r.text for r in generate_batch(model, tokenizer, conversations, **kw)]
