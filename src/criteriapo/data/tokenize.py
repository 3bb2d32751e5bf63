"""Tokenization for training, through the tokenizer's own chat template.

Conversational text is rendered with ``apply_chat_template``; a completion's tokens are the exact
suffix of the whole conversation's tokens after the prompt's (checked: a template that breaks this
raises :class:`TemplateError`). Standard text is tokenized as it is, prompt and completion
separately, as a model sees them at generation time. EOS is appended only when the completion has
none. Labels are masked (-100) on the prompt and on any non-assistant message.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jinja2

from criteriapo.config import check_lengths
from criteriapo.data.formats import DataKind
from criteriapo.data.records import (
    BadRow,
    Message,
    PreferenceExample,
    RowProblem,
    RowRef,
    SFTExample,
    Text,
    UnpairedExample,
)
from criteriapo.data.validation import apply_policy
from criteriapo.errors import DataError, TemplateError

IGNORE_INDEX = -100
log = logging.getLogger(__name__)
TruncationMode = Literal["keep_end", "keep_start"]
LongPrompts = Literal["cut", "drop", "error"]


@dataclass(frozen=True)
class TokenizeOptions:
    """``max_length`` bounds prompt + completion; ``max_prompt_length`` bounds the prompt, cut by
    ``truncation_mode``: ``keep_end`` keeps its last tokens (the question), ``keep_start`` its first.
    A prompt that alone reaches ``max_length`` is too long: ``long_prompts`` cut (its start goes, by
    ``truncation_mode``, to leave the completion its own length, up to half of ``max_length``), drop
    (the row is left out) or error (a bad row). A completion longer than the room the prompt leaves
    is cut at its end."""

    max_length: int | None = 1024
    max_prompt_length: int | None = None
    truncation_mode: TruncationMode = "keep_end"
    long_prompts: LongPrompts = "cut"

    def __post_init__(self) -> None:
        check_lengths(self.max_length, self.max_prompt_length, self.truncation_mode, self.long_prompts)


class PromptTooLong(RowProblem):
    """Under ``long_prompts: drop``: the row is left out and counted, not reported as a bad row."""


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: RowRef
    criterion: str | None = None
    weight: float = 1.0
    prompt_cut: int = 0  # tokens cut from the prompt's start (or end) to fit max_length


@dataclass
class TokenizedUnpaired:
    """KTO's unit: a prompt, its completion and label, and the mismatched completion (another
    prompt's) whose log-ratio estimates the KL term; ``kl_ids`` is set by :func:`assign_kl`."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    source: RowRef
    kl_ids: list[int] = dataclasses.field(default_factory=list)
    prompt_cut: int = 0

    def as_pair(self) -> TokenizedPair:
        """The completion and the KL completion after one prompt: scored, collated and cached as a
        pair's chosen and rejected are (the label plays no part there)."""
        return TokenizedPair(self.prompt_ids, self.completion_ids, self.kl_ids, self.source)


@dataclass
class TokenizedSFT:
    input_ids: list[int]
    labels: list[int]
    source: RowRef
    prompt_cut: int = 0

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


class ChatTokenizer:
    """Wraps a Hugging Face tokenizer with the checks training needs."""

    def __init__(self, tokenizer: Any, eos_token_ids: Iterable[int] = (), name: str = "the tokenizer"):
        self.tok = tokenizer
        self.name = name
        eos = set(eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        if not eos:
            raise TemplateError(f"{name} has no EOS token; set eos_token in its tokenizer_config.json")
        self.eos_ids = eos
        self.append_eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(eos)
        specials = sorted(
            {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
            | set(tokenizer.all_special_tokens),
            key=len,
            reverse=True,
        )
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None

    # -- rendering ---------------------------------------------------------------------------
    def _render(self, messages: list[Message], generation_prompt: bool) -> list[int]:
        if not getattr(self.tok, "chat_template", None):
            raise TemplateError(
                f"{self.name} has no chat template, so conversational data cannot be "
                "rendered; give the model a chat template or use standard (string) data"
            )
        try:
            ids = self.tok.apply_chat_template(
                messages, tokenize=True, return_dict=False, add_generation_prompt=generation_prompt
            )
        except jinja2.TemplateError as e:  # templates refuse some conversations, e.g. roles out of turn
            raise RowProblem(
                None, f"the chat template of {self.name} refuses this conversation: {e}"
            ) from None
        return list(ids)

    def _check_text(self, text: Text, field: str) -> None:
        if self._special_re is None:
            return
        parts = (
            [(field, text)]
            if isinstance(text, str)
            else [(f"{field}[{i}].content", m["content"]) for i, m in enumerate(text)]
        )
        for where, s in parts:
            if (m := self._special_re.search(s)) is not None:
                raise RowProblem(
                    where,
                    f"contains the control token {m.group()!r}, which would be read as "
                    "markup rather than text; remove or escape it",
                )

    def prompt_ids(self, prompt: Text) -> list[int]:
        if isinstance(prompt, str):
            return self.tok(prompt, add_special_tokens=True).input_ids if prompt else self._bos()
        return self._render(prompt, generation_prompt=True)

    def _bos(self) -> list[int]:
        # plain text with no prompt still starts as the tokenizer would start any text
        return self.tok("", add_special_tokens=True).input_ids

    def completion_ids(
        self, prompt: Text, prompt_ids: list[int], completion: Text, source: RowRef
    ) -> list[int]:
        if isinstance(completion, str):
            ids = self.tok(completion, add_special_tokens=False).input_ids
        else:
            full = self._render(prompt + completion, generation_prompt=False)
            self._check_prefix(prompt_ids, full, source)
            ids = full[len(prompt_ids) :]
        if not self.eos_ids.intersection(ids):
            ids = ids + [self.append_eos_id]
        return ids

    def _check_prefix(self, prefix: list[int], full: list[int], source: RowRef) -> None:
        if full[: len(prefix)] != prefix:
            pairs = zip(prefix, full, strict=False)
            at = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(prefix), len(full)))
            expected, got = self.tok.decode(prefix[at : at + 8]), self.tok.decode(full[at : at + 8])
            raise TemplateError(
                f"{source}: the chat template of {self.name} does not render the prompt as the beginning of "
                f"prompt + completion (they differ at token {at}: {expected!r} vs {got!r}), so the "
                "completion's tokens cannot be isolated. "
                "Use a template that renders earlier turns unchanged (e.g. one that does not strip "
                "reasoning from past assistant turns)."
            )

    # -- examples ----------------------------------------------------------------------------
    def encode_pair(self, ex: PreferenceExample, opts: TokenizeOptions) -> TokenizedPair:
        for field in ("prompt", "chosen", "rejected"):
            self._check_text(getattr(ex, field), field)
        prompt_ids = self.prompt_ids(ex.prompt)
        chosen = self.completion_ids(ex.prompt, prompt_ids, ex.chosen, ex.source)
        rejected = self.completion_ids(ex.prompt, prompt_ids, ex.rejected, ex.source)
        prompt_ids, room, cut = _fit(prompt_ids, max(len(chosen), len(rejected)), opts)
        return TokenizedPair(
            prompt_ids, chosen[:room], rejected[:room], ex.source, ex.criterion, ex.weight, cut
        )

    def encode_unpaired(self, ex: UnpairedExample, opts: TokenizeOptions) -> TokenizedUnpaired:
        for name in ("prompt", "completion"):
            self._check_text(getattr(ex, name), name)
        prompt_ids = self.prompt_ids(ex.prompt)
        completion = self.completion_ids(ex.prompt, prompt_ids, ex.completion, ex.source)
        prompt_ids, room, cut = _fit(prompt_ids, len(completion), opts)
        return TokenizedUnpaired(prompt_ids, completion[:room], ex.label, ex.source, prompt_cut=cut)

    def encode_sft(self, ex: SFTExample, opts: TokenizeOptions) -> TokenizedSFT:
        self._check_text(ex.prompt, "prompt")
        self._check_text(
            ex.completion, "completion" if ex.prompt or isinstance(ex.completion, list) else "text"
        )
        prompt_ids = self.prompt_ids(ex.prompt)
        if isinstance(ex.completion, str):
            body = self.completion_ids(ex.prompt, prompt_ids, ex.completion, ex.source)
            mask = [True] * len(body)
        else:
            body, mask = self._assistant_turns(ex.prompt, prompt_ids, ex.completion, ex.source)
        prompt_ids, room, cut = _fit(prompt_ids, len(body), opts)
        body, mask = body[:room], mask[:room]
        if not any(mask):
            raise RowProblem(
                "completion",
                "no trainable token left after truncation to max_length "
                f"{opts.max_length}; raise max_length or shorten the prompt",
            )
        labels = [IGNORE_INDEX] * len(prompt_ids) + [
            t if m else IGNORE_INDEX for t, m in zip(body, mask, strict=True)
        ]
        return TokenizedSFT(prompt_ids + body, labels, ex.source, cut)

    def _assistant_turns(
        self, prompt: list[Message], prompt_ids: list[int], completion: list[Message], source: RowRef
    ) -> tuple[list[int], list[bool]]:
        """Tokens after the prompt, and which are trained: the assistant messages only."""
        messages = prompt + completion
        full = self._render(messages, generation_prompt=False)
        self._check_prefix(prompt_ids, full, source)
        mask = [False] * len(full)
        span = (len(full), len(full))
        for j in range(len(prompt), len(messages)):
            if messages[j]["role"] != "assistant":
                continue
            start = self._render(messages[:j], generation_prompt=True)
            end = self._render(messages[: j + 1], generation_prompt=False)
            self._check_prefix(start, full, source)
            self._check_prefix(end, full, source)
            span = (len(start), len(end))
            mask[span[0] : span[1]] = [True] * (span[1] - span[0])
        if not self.eos_ids.intersection(full[span[0] : span[1]]):  # the last turn has no end marker
            full.insert(span[1], self.append_eos_id)
            mask.insert(span[1], True)
        body, mask = full[len(prompt_ids) :], mask[len(prompt_ids) :]
        return body, mask


def _truncate_prompt(prompt_ids: list[int], opts: TokenizeOptions) -> list[int]:
    n = opts.max_prompt_length
    if n is None or len(prompt_ids) <= n:
        return prompt_ids
    return prompt_ids[-n:] if opts.truncation_mode == "keep_end" else prompt_ids[:n]


def _fit(
    prompt_ids: list[int], completion_len: int, opts: TokenizeOptions
) -> tuple[list[int], int | None, int]:
    """The prompt as kept, the room left for its completion (None: no limit), and how many prompt
    tokens were cut to leave that room (see :class:`TokenizeOptions`)."""
    prompt_ids = _truncate_prompt(prompt_ids, opts)
    if opts.max_length is None or len(prompt_ids) < opts.max_length:
        return prompt_ids, None if opts.max_length is None else opts.max_length - len(prompt_ids), 0
    why = f"the prompt alone is {len(prompt_ids)} tokens, max_length is {opts.max_length}"
    why += ": no room for the completion"
    if opts.long_prompts == "drop":
        raise PromptTooLong("prompt", why)
    if opts.long_prompts == "error":
        raise RowProblem(
            "prompt", f"{why}; raise max_length, or set long_prompts: cut (keeps the prompt's end) or drop"
        )
    room = max(1, min(completion_len, opts.max_length // 2))
    over = len(prompt_ids) + room - opts.max_length
    kept = prompt_ids[over:] if opts.truncation_mode == "keep_end" else prompt_ids[: len(prompt_ids) - over]
    return kept, room, over


# each data kind's examples (one record type) and how they are tokenized
KIND_OF = {
    PreferenceExample: DataKind.PREFERENCE,
    UnpairedExample: DataKind.UNPAIRED,
    SFTExample: DataKind.SFT,
}
ENCODERS = {
    DataKind.PREFERENCE: ChatTokenizer.encode_pair,
    DataKind.UNPAIRED: ChatTokenizer.encode_unpaired,
    DataKind.SFT: ChatTokenizer.encode_sft,
}


def tokenize_examples(
    examples: Sequence[PreferenceExample | SFTExample | UnpairedExample],
    tokenizer: ChatTokenizer,
    opts: TokenizeOptions,
    *,
    kind: DataKind | None = None,
    on_bad_row: str = "error",
    report_path: Any = None,
    counts: dict[str, int] | None = None,
) -> list:
    """Tokenize every example with its data kind's encoder (:data:`ENCODERS`); with ``kind``, every
    example must be of that kind. Rows that cannot be tokenized go through the bad-row policy.
    ``counts`` (when given) gets ``prompt_cut`` and ``prompt_dropped``: the rows whose prompt was cut
    to fit max_length, and those left out for it (``long_prompts``)."""
    out, bad, dropped = [], [], 0
    for ex in examples:
        found = KIND_OF[type(ex)]
        if kind is not None and found != kind:
            raise DataError(
                f"{ex.source.file}, row {ex.source.row}: a {found} row where {kind} rows were expected"
            )
        try:
            out.append(ENCODERS[found](tokenizer, ex, opts))
        except PromptTooLong:
            dropped += 1
        except RowProblem as p:
            bad.append(BadRow(ex.source.file, ex.source.row, p.field, p.reason))
    if counts is not None:
        counts["prompt_cut"] = counts.get("prompt_cut", 0) + sum(1 for t in out if t.prompt_cut)
        counts["prompt_dropped"] = counts.get("prompt_dropped", 0) + dropped
    if not out and dropped:
        raise DataError(
            f"every row's prompt is too long for max_length {opts.max_length} (long_prompts: drop); "
            "raise max_length, or set long_prompts: cut"
        )
    policy = "error" if not out else on_bad_row  # skipping everything leaves nothing to train on
    apply_policy(bad, len(examples), policy, stage="tokenizing", report_path=report_path)
    return out


def assign_kl(examples: Sequence[TokenizedUnpaired], seed: int, opts: TokenizeOptions) -> None:
    """Give each example the completion of another, with a different prompt, for the KL estimate
    (mismatched prompt and completion, as in the KTO paper and TRL). The partners are a seeded
    shuffle taken in a ring, so they are fixed for a dataset and seed: the reference scores them
    once, and a resumed run sees the same ones. Cut to max_length after the example's prompt."""
    import random

    order = list(range(len(examples)))
    random.Random(f"kl {seed}").shuffle(order)
    n, same = len(order), 0
    for k, i in enumerate(order):
        partner = next(
            (
                order[(k - step) % n]
                for step in range(1, min(n, 64))
                if examples[order[(k - step) % n]].prompt_ids != examples[i].prompt_ids
            ),
            None,
        )
        if partner is None:  # every nearby prompt the same: the best there is, said once
            partner = order[(k - 1) % n]
            same += 1
        room = None if opts.max_length is None else max(1, opts.max_length - len(examples[i].prompt_ids))
        examples[i].kl_ids = examples[partner].completion_ids[:room]
    if same:
        log.warning(
            "KTO: %d of %d examples found no completion of another prompt for the KL estimate (their "
            "prompts are all the same); it then uses completions of the same prompt",
            same,
            n,
        )
