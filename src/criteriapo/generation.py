"""Text generation from a chat model: one prompt in, the assistant's reply out."""

from __future__ import annotations

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
) -> str:
    """The reply to ``messages``; greedy when ``temperature`` is 0, sampled (seeded) otherwise."""
    import torch

    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            **sampling,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def generate_in_thread(model: Any, tokenizer: Any, messages: list[Message], streamer: Any, **kw: Any):
    """Start :func:`generate` in a thread that feeds ``streamer``; returns the thread."""
    import threading

    thread = threading.Thread(
        target=generate, args=(model, tokenizer, messages), kwargs={"streamer": streamer, **kw}, daemon=True
    )
    thread.start()
    return thread


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
    seed: int = 0,
    batch_size: int = 16,
) -> list[Reply]:
    """``samples`` replies per conversation (conversation-major: all of the first's, then the
    second's, ...), sampled in left-padded batches of about ``batch_size`` sequences; the same seed
    gives the same replies. A reply is cut off when none of its new tokens ends the turn.

    With several samples, each prompt is computed once and its keys and values copied to its
    samples (:func:`_prefilled`) instead of computing the same prompt ``samples`` times."""
    import torch

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    eos = _eos_ids(model, tokenizer)
    per_batch = max(1, batch_size // samples)  # prompts per batch
    out: list[Reply] = []
    try:
        for start in range(0, len(conversations), per_batch):
            chunk = conversations[start : start + per_batch]
            enc = tokenizer.apply_chat_template(
                chunk, add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True
            ).to(model.device)
            torch.manual_seed(seed + start)
            with torch.inference_mode():
                inputs = _prefilled(model, enc, samples) if samples > 1 else dict(enc)
                ids = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
                )
            new = ids[:, enc["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            for row, text in zip(new.tolist(), texts, strict=True):
                out.append(Reply(text.strip(), not any(t in eos for t in row)))
    finally:
        tokenizer.padding_side = side
    return out


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
