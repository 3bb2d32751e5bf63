"""One model serving many requests: requests wait in a bounded queue; a worker thread generates
their replies together, each with its own sampling settings, stop strings and seed, streaming each
reply's text as it settles. With a model whose cache allows it, the batch is continuous
(:mod:`criteriapo.generation.continuous`): waiting requests join the running batch between tokens
(up to ``max_batch`` replies at once; with an SDPA model, computed in the batch's next forward
pass: :class:`~criteriapo.generation.continuous.FusedBatch`) and finished replies leave it;
otherwise the waiting requests are generated together as one batch, and the next ones wait for it
to end. A request whose client has gone is cancelled: its reply stops at the next token."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from criteriapo.generation import Reply, Sampling, generate_batch
from criteriapo.generation.continuous import FusedBatch, Request, batch_maker, supported

log = logging.getLogger(__name__)


class Busy(Exception):
    """The queue is full: the client should retry later."""


@dataclass
class Job:
    """One reply to make: the prompt's token ids, its settings, where its text goes as it comes
    (``on_text``, from the worker thread), and where the reply goes at the end (``on_done``: the
    reply, or the exception that stopped the batch)."""

    prompt_ids: list[int]
    sampling: Sampling
    on_done: Callable[[Reply | None, BaseException | None], None]
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class Counts:
    served: int = 0
    cancelled: int = 0
    failed: int = 0
    batches: int = 0
    largest_batch: int = 0


class Engine:
    """Batched generation on one model for concurrent requests (see the module's docstring).
    ``batch_wait_s``: how long the worker waits, once a request is in, for others to join it."""

    def __init__(
        self, model: Any, tokenizer: Any, max_batch: int = 8, max_queue: int = 64, batch_wait_s: float = 0.01
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.batch_wait_s = max_batch, max_queue, batch_wait_s
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self.counts = Counts()
        self.running = 0
        self.continuous = supported(model)
        self.fused = False  # joining prompts computed in the running batch's forward (set by the worker)
        self._thread = threading.Thread(target=self._work, name="criteriapo-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        if self._queue.qsize() >= self.max_queue:
            raise Busy(f"{self._queue.qsize()} requests are waiting (the limit, --max-queue)")
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _take(self, most: int, wait: bool) -> list[Job] | None:
        """Up to ``most`` waiting jobs not cancelled; with ``wait``, block for the first, then give
        others ``batch_wait_s`` to arrive. None when the engine is closing."""
        jobs: list[Job] = []
        if wait:
            first = self._queue.get()
            if first is None:
                return None
            jobs.append(first)
        deadline = time.monotonic() + (self.batch_wait_s if wait else 0.0)
        while len(jobs) < most:
            try:
                job = (
                    self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    if wait
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop once the running replies are done
                break
            jobs.append(job)
        live = [j for j in jobs if not j.cancel.is_set()]
        for j in jobs:
            if j.cancel.is_set():
                self.counts.cancelled += 1
                j.on_done(None, None)
        return live

    def _work(self) -> None:
        if self.continuous:
            self._work_continuously()
            return
        while (jobs := self._take(self.max_batch, wait=True)) is not None:
            if jobs:
                self._run(jobs)

    def _work_continuously(self) -> None:
        make = batch_maker(self.model, self.tokenizer, self.max_batch)
        batch = make()
        self.fused = isinstance(batch, FusedBatch)
        while True:
            room = self.max_batch - len(batch)
            jobs = self._take(room, wait=not len(batch)) if room else []
            if jobs is None:
                return
            try:
                if jobs:
                    self.counts.batches += 1
                    self._finish(
                        batch.add([Request(j.prompt_ids, j.sampling, j, j.on_text, j.cancel) for j in jobs])
                    )
                self.running = len(batch)
                self.counts.largest_batch = max(self.counts.largest_batch, len(batch))
                self._finish(batch.step())
            except Exception as e:  # noqa: BLE001 - every running request is told; the worker goes on
                running = {id(r.request.key): r.request.key for r in batch.rows}
                self._fail(list(({id(j): j for j in jobs} | running).values()), e)
                batch = make()
            self.running = len(batch)

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        log.exception("generation failed for a batch of %d", len(jobs))
        self.counts.failed += len(jobs)
        for j in jobs:
            j.on_done(None, error)

    def _finish(self, done: list[tuple[Job, Reply]]) -> None:
        for job, reply in done:
            if reply.finish_reason == "interrupted":
                self.counts.cancelled += 1
            else:
                self.counts.served += 1
            job.on_done(reply, None)

    def _run(self, jobs: list[Job]) -> None:
        self.running = len(jobs)
        self.counts.batches += 1
        self.counts.largest_batch = max(self.counts.largest_batch, len(jobs))
        try:
            replies = generate_batch(
                self.model,
                self.tokenizer,
                [j.prompt_ids for j in jobs],
                [j.sampling for j in jobs],
                batch_size=len(jobs),
                on_text=lambda i, piece: jobs[i].on_text(piece) if jobs[i].on_text else None,
                interrupt=[j.cancel for j in jobs],
            )
        except Exception as e:  # noqa: BLE001 - each waiting request is told; the worker goes on
            self._fail(jobs, e)
        else:
            self._finish(list(zip(jobs, replies, strict=True)))
        finally:
            self.running = 0
