"""One reply, streamed: iterate for its text as it is generated; stop it from any thread."""

from __future__ import annotations

import queue
import threading
from typing import Any

from criteriapo.data.records import Message
from criteriapo.generation.batch import Reply, generate_batch
from criteriapo.generation.options import GREEDY, Sampling

_END = object()


class ReplyStream:
    """The reply to ``messages``, generated in a thread of its own. Iterating yields its settled text
    pieces as they come (see :class:`~criteriapo.generation.replies.ReplyText`); :meth:`stop` ends it
    after the current token; :meth:`result` waits for the end and returns the whole :class:`Reply`
    (``interrupted`` when stopped). A KeyboardInterrupt while iterating stops the reply and is
    raised again, so a caller can show what was said and go on."""

    def __init__(self, model: Any, tokenizer: Any, messages: list[Message], sampling: Sampling = GREEDY):
        self._pieces: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._out: dict[str, Any] = {}
        self._thread = threading.Thread(
            target=self._work, args=(model, tokenizer, messages, sampling), daemon=True
        )
        self._thread.start()

    def _work(self, model: Any, tokenizer: Any, messages: list[Message], sampling: Sampling) -> None:
        try:
            replies = generate_batch(
                model,
                tokenizer,
                [messages],
                sampling,
                on_text=lambda _, piece: self._pieces.put(piece),
                interrupt=self._stop,
            )
            self._out["reply"] = replies[0]
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread by result()
            self._out["error"] = e
        finally:
            self._pieces.put(_END)

    def __iter__(self):
        try:
            while (piece := self._pieces.get()) is not _END:
                yield piece
        except KeyboardInterrupt:
            self.stop()
            raise

    def stop(self) -> None:
        self._stop.set()

    def result(self) -> Reply:
        while self._thread.is_alive():
            try:
                self._thread.join()
            except KeyboardInterrupt:  # another Ctrl-C while the current token finishes
                self.stop()
        if "error" in self._out:
            raise self._out["error"]
        return self._out["reply"]
