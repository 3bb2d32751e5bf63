"""Generation from a chat model: one sampling-options type (:class:`Sampling`), batched replies
(:func:`generate_batch`), a streamed reply (:class:`ReplyStream`). Random draws use a generator of
the call's own and the tokenizer is never changed, so anything long-running can generate between
its own work."""

from criteriapo.generation.batch import (
    Prompt,
    Reply,
    chat_messages,
    eos_ids,
    generate,
    generate_batch,
    prompt_ids,
    sample_batch,
)
from criteriapo.generation.options import Sampling
from criteriapo.generation.stream import ReplyStream

__all__ = [
    "Prompt",
    "Reply",
    "ReplyStream",
    "Sampling",
    "chat_messages",
    "eos_ids",
    "generate",
    "generate_batch",
    "prompt_ids",
    "sample_batch",
]
