"""Rich progress bars and one-line epoch summaries for training and evaluation."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

console = Console(stderr=True, highlight=False)
if not console.is_terminal:  # a pipe or a log: wide tables, not columns squashed to 80
    console = Console(stderr=True, highlight=False, width=200)


def make_progress() -> Progress:
    """A progress display: description, bar, count, elapsed/remaining, and live metrics."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=console,
        transient=True,  # rich draws the bars only on a terminal; logs get the epoch lines
    )


class Meter:
    """Running sums of loss/accuracy/throughput for one epoch."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, float] = {}
        self.start = time.perf_counter()

    def update(self, n: int, **values: float) -> None:
        self.n += n
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n

    def mean(self) -> dict[str, float]:
        out = {k: v / max(self.n, 1) for k, v in self.sums.items()}
        out["img_s"] = self.n / max(time.perf_counter() - self.start, 1e-9)
        return out

    def text(self) -> str:
        return "  ".join(f"{k} {v:.4g}" if k != "img_s" else f"{v:.0f} img/s" for k, v in self.mean().items())


def track(progress: Progress | None, items: Iterable[T], total: int, description: str, meter: Meter) -> Iterator[T]:
    """Iterate ``items`` while a progress task shows ``meter``'s running metrics."""
    if progress is None:
        yield from items
        return
    task = progress.add_task(description, total=total, metrics="")
    try:
        for item in items:
            yield item
            progress.update(task, advance=1, metrics=meter.text())
    finally:
        progress.remove_task(task)


def log(message: str, **kw: Any) -> None:
    console.print(message, **kw)
