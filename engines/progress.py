"""Progress of an export or build: each step's name and wall-clock duration, for the CLI to print.

The build logic only names its steps (``with steps("export mapper to ONNX"): ...``); how they are
shown is the caller's ``callback`` (``ism_edge_cli.build.StepPrinter`` prints a spinner and a tick).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

StepCallback = Callable[[str, "float | None"], None]


@dataclass
class Steps:
    """Names and wall-clock durations of build steps; ``callback(name, None)`` at the start of a
    step, ``callback(name, seconds)`` at its end, and ``callback("total", seconds)`` from
    :meth:`done` (seconds since the ``Steps`` was created)."""

    callback: StepCallback | None = None
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.callback is not None:
            self.callback(name, None)
        t = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - t
        if self.callback is not None:
            self.callback(name, self.timings[name])

    def done(self) -> None:
        """Report the total wall-clock time of the whole run."""
        if self.callback is not None:
            self.callback("total", time.perf_counter() - self.started)
