"""Live progress bars: a training run's (step, loss, accuracy, tokens/s and time left), and one for
any other long piece of work (scoring a reference, sampling data, evaluating)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressBar:
    def __init__(self, label: str, console: Console | None = None):
        self.label = label
        self._p = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
        )
        self._task = None

    def start(self, total: int, done: int) -> None:
        self._p.start()
        self._task = self._p.add_task(self.label, total=total, completed=done, stats="")

    def update(self, step: int, m: dict[str, float]) -> None:
        stats = f"loss {m['loss']:.4f}"
        if "rewards/accuracies" in m:
            stats += f"  acc {m['rewards/accuracies']:.2f}"
        stats += f"  {m['tokens_per_second']:.0f} tok/s"
        self._p.update(self._task, completed=step, stats=stats)

    def stop(self) -> None:
        self._p.stop()


@contextlib.contextmanager
def work_progress(
    label: str, total: int, console: Console | None = None, shown: bool = True
) -> Iterator[Callable[[int], None]]:
    """A bar for ``total`` units of work; yields ``advance(n)``. On a console that is not a terminal
    (a log file) it shows its last state once, at the end; with ``shown`` false (a process other
    than rank 0) nothing is shown."""
    if not shown:
        yield lambda n: None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
    )
    with progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.update(task, advance=n)
