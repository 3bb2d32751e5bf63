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
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    batch_size: int = 16,
) -> list[Reply]:
    """One reply per conversation, sampled in left-padded batches; the same seed gives the same
    replies. A reply is cut off when none of its new tokens ends the turn."""
    import torch

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    eos = _eos_ids(model, tokenizer)
    out: list[Reply] = []
    try:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            enc = tokenizer.apply_chat_template(
                chunk, add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True
            ).to(model.device)
            torch.manual_seed(seed + start)
            with torch.inference_mode():
                ids = model.generate(
                    **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
                )
            new = ids[:, enc["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            for row, text in zip(new.tolist(), texts, strict=True):
                out.append(Reply(text.strip(), not any(t in eos for t in row)))
    finally:
        tokenizer.padding_side = side
    return out


def sample_batch(model: Any, tokenizer: Any, conversations: list[list[Message]], **kw: Any) -> list[str]:
    """The texts of :func:`generate_batch`."""
    return [r.text for r in generate_batch(model, tokenizer, conversations, **kw)]
