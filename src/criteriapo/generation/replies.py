"""A reply as its tokens arrive: decoded as it grows, shown only where the text is final, ended at
the end of turn or before a stop string."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str = "stop"  # stop (end of turn or a stop string), length, interrupted
    tokens: int = 0  # generated, the end of turn not counted

    @property
    def cut_off(self) -> bool:
        """The token limit stopped it before the model ended its reply."""
        return self.finish_reason == "length"


class ReplyText:
    """One reply's tokens, text and end (at most ``limit`` tokens). :meth:`add` takes the next token
    and returns the text that may be shown now: text that a later token could still change (a
    character whose bytes are not all there, the start of a stop string) is held back until it is
    settled."""

    def __init__(
        self, tokenizer: Any, eos_ids: Iterable[int], stop: tuple[str, ...] = (), limit: int | None = None
    ):
        self.tok, self.eos, self.stop, self.limit = tokenizer, set(eos_ids), stop, limit
        self.ids: list[int] = []
        self.text = ""  # the reply so far, up to (not including) a stop string
        self.shown = 0  # characters of ``text`` handed out
        self.finish: str | None = None

    def add(self, token: int) -> str:
        if self.finish is not None:
            return ""  # generate pads a finished row until the batch ends
        if token in self.eos:
            self.finish = "stop"
            return self._rest()
        self.ids.append(token)
        self.text = self.tok.decode(self.ids, skip_special_tokens=True)
        ends = [i for s in self.stop if (i := self.text.find(s)) >= 0]
        if ends:
            self.text, self.finish = self.text[: min(ends)], "stop"
            return self._rest()
        if self.limit is not None and len(self.ids) >= self.limit:
            self.finish = "length"
            return self._rest()
        return self._settled()

    def end(self, reason: str) -> str:
        """The row stopped without an end of turn (``length`` or ``interrupted``): the held text."""
        if self.finish is None:
            self.finish = reason
        return self._rest()

    def reply(self) -> Reply:
        """The finished reply: its text (stripped), why it ended, and its token count."""
        return Reply(self.text.strip(), self.finish, len(self.ids))

    def _settled(self) -> str:
        text = self.text.rstrip("\ufffd")  # a character split across tokens is not there yet
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        safe = max(len(text) - held, self.shown)  # held: the end that begins a stop string
        piece, self.shown = self.text[self.shown : safe], safe
        return piece

    def _rest(self) -> str:
        piece, self.shown = self.text[self.shown :], len(self.text)
        return piece
