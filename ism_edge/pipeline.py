"""The camera loop of ``ism-edge run``: capture → defend → log → render, and a summary at exit.

In the spirit of jetson-inference's examples: a reader thread captures (dropping the oldest
frames of a live source so latency never grows), the runtime judges each frame, every verdict is
appended to the JSON-lines log at once, and annotated frames go to a video file, an image
folder or a window. When frame N+1 is already waiting it is submitted before frame N is
collected, so on TensorRT its upload overlaps N's compute; when none is waiting (a live source
at its own pace) frame N is answered at once rather than one capture later.

Ctrl-C, SIGTERM and SIGHUP stop the loop gracefully (the frame in flight is finished and logged,
outputs are closed, the summary is printed); a second one interrupts at once. A frame the runtime
rejects (wrong shape, dtype, NaNs) is counted as skipped and logged as such; a lost or stalled
source ends the run with its one-line error *after* everything already processed is written.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import numpy as np

from ism_edge.errors import FrameError, IsmEdgeError
from ism_edge.outputs import FrameSink, ImageFolderOutput, OutputError, VerdictLog
from ism_edge.render import annotate
from ism_edge.runtime import DefenseRuntime, Pending
from ism_edge.sources import Captured, FrameReader, Skipped


@dataclass(frozen=True)
class RunOptions:
    """``max_frames``: stop after that many frames (``None``: until the source ends).
    ``status_interval``: seconds between calls of the status callback."""

    max_frames: int | None = None
    status_interval: float = 1.0

    def __post_init__(self) -> None:
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")


@dataclass
class RunSummary:
    """What a run did: frames judged, flagged, dropped and skipped, latency and throughput.

    ``latency`` is from capture (the reader thread's read) to the verdict, in milliseconds;
    ``fps`` is frames judged per second of wall time from the first capture to the last verdict.
    ``timeline`` holds, per judged frame, (seconds from the first capture to its capture, its
    latency in ms): to see whether latency grows over a run (not part of :meth:`to_json`).
    ``frames`` counts the frames whose verdict reached every output; ``outputs`` says, per output
    (``log``, ``video``, ``images``, ``purified``), how many frames are in it and whether it is
    ``complete`` (no write failed).
    """

    source: str
    backend: str = ""
    frames: int = 0
    flagged: int = 0
    dropped: int = 0
    skipped: int = 0
    reconnects: int = 0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    fps: float | None = None
    seconds: float = 0.0
    stopped: str = "end"  # end | max-frames | interrupted | window | error
    signal: str | None = None  # the signal that interrupted the run (SIGINT, SIGTERM, SIGHUP)
    error: str | None = None
    labels: dict[str, int] = field(default_factory=dict)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    failure: IsmEdgeError | None = field(default=None, repr=False)
    timeline: list[tuple[float, float]] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        def r(v: float | None, d: int = 3) -> float | None:
            return None if v is None else round(v, d)

        return {
            "source": self.source,
            "backend": self.backend,
            "frames": self.frames,
            "flagged": self.flagged,
            "dropped": self.dropped,
            "skipped": self.skipped,
            "reconnects": self.reconnects,
            "latency_p50_ms": r(self.latency_p50_ms),
            "latency_p99_ms": r(self.latency_p99_ms),
            "fps": r(self.fps, 2),
            "seconds": r(self.seconds),
            "stopped": self.stopped,
            "signal": self.signal,
            "error": self.error,
            "labels": dict(self.labels),
            "outputs": [dict(o) for o in self.outputs],
        }


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def graceful_interrupt(stop: threading.Event) -> Iterator[list[int]]:
    """In the main thread: the first SIGINT, SIGTERM or SIGHUP sets ``stop``, a second raises
    KeyboardInterrupt. Yields the list of signals received (the first one stopped the run)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        received.append(signum)
        stop.set()

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


class _Fps:
    """Exponential moving average of the verdict rate (for the overlay)."""

    def __init__(self) -> None:
        self.value: float | None = None
        self._last: float | None = None

    def tick(self, now: float) -> float | None:
        if self._last is not None and now > self._last:
            rate = 1.0 / (now - self._last)
            self.value = rate if self.value is None else 0.9 * self.value + 0.1 * rate
        self._last = now
        return self.value


def run_pipeline(
    runtime: DefenseRuntime,
    reader: FrameReader,
    *,
    log: VerdictLog | None = None,
    sinks: Sequence[FrameSink] = (),
    purified: ImageFolderOutput | None = None,
    options: RunOptions | None = None,
    status: Callable[[RunSummary], None] | None = None,
    stop: threading.Event | None = None,
) -> RunSummary:
    """Run the loop until the source ends, ``max_frames``, Ctrl-C, a closed window or an error.

    The reader must not be started yet (it is started and stopped here); the log and sinks are
    closed here. Expected failures do not raise: they end the run and are returned in
    ``summary.failure`` (with ``summary.error`` its message) after the summary is complete.
    """
    opts = options or RunOptions()
    stop = stop or threading.Event()
    summary = RunSummary(source=str(reader.source.uri), backend=runtime.backend_name)
    latencies: list[float] = []
    labels: Counter[str] = Counter()
    fps = _Fps()
    first_capture: float | None = None
    last_verdict: float | None = None
    last_status = time.perf_counter()
    visual = bool(sinks)
    in_flight: tuple[Captured, Pending] | None = None
    taken = 0

    def finish(item: Captured, pending: Pending) -> None:
        """Collect a verdict and write it to every output; count it once all of them took it."""
        nonlocal last_verdict
        verdict = runtime.collect(pending)[0]
        now = time.perf_counter()
        latency = (now - item.t_capture) * 1e3
        if log is not None:
            log.write({**_where(item), "latency_ms": round(latency, 3), **verdict.to_json()})
        rate = fps.tick(now)
        if visual:
            image = annotate(item.image, verdict, fps=rate)
            for sink in sinks:
                sink.write(image)
        if purified is not None and verdict.purified is not None:
            purified.write(verdict.purified)
        last_verdict = now
        latencies.append(latency)
        start = item.t_capture if first_capture is None else first_capture
        summary.timeline.append((item.t_capture - start, latency))
        summary.frames += 1
        summary.flagged += int(verdict.flagged)
        labels[verdict.label] += 1

    received: list[int] = []
    started = time.perf_counter()
    try:
        with graceful_interrupt(stop) as received, reader:
            while True:
                if stop.is_set():
                    summary.stopped = "interrupted"
                    break
                if any(s.stop_requested for s in sinks):
                    summary.stopped = "window"
                    break
                if opts.max_frames is not None and taken >= opts.max_frames:
                    summary.stopped = "max-frames"
                    break
                if in_flight is not None and len(reader.queue) == 0:
                    # No frame is waiting (a live source at its own pace): answer the frame in
                    # flight now instead of holding its verdict until the next capture.
                    answer, in_flight = in_flight, None
                    finish(*answer)
                item = reader.get(stop=stop)
                if item is None:
                    summary.stopped = "interrupted" if stop.is_set() else "end"
                    break
                if isinstance(item, Skipped):  # an unreadable file of a folder: logged in its place
                    previous, in_flight = in_flight, None
                    if previous is not None:
                        finish(*previous)
                    summary.skipped += 1
                    if log is not None:
                        log.write({**_where(item), "skipped": True, "error": item.reason})
                    continue
                taken += 1
                if first_capture is None:
                    first_capture = item.t_capture
                try:
                    pending = runtime.submit(item.image, purified=purified is not None)
                except FrameError as e:
                    previous, in_flight = in_flight, None
                    if previous is not None:
                        finish(*previous)  # keep the log in frame order
                    summary.skipped += 1
                    if log is not None:
                        log.write({**_where(item), "skipped": True, "error": str(e)})
                    continue
                previous, in_flight = in_flight, (item, pending)
                if previous is not None:
                    finish(*previous)
                if status is not None and time.perf_counter() - last_status >= opts.status_interval:
                    last_status = time.perf_counter()
                    summary.dropped = reader.dropped
                    summary.seconds = last_status - started
                    status(summary)
            last, in_flight = in_flight, None
            if last is not None:
                finish(*last)
    except (IsmEdgeError, MemoryError) as e:
        last, in_flight = in_flight, None
        if last is not None and not isinstance(e, OutputError):  # after a failed write, write nothing more
            with contextlib.suppress(IsmEdgeError, MemoryError):
                finish(*last)
        err = e if isinstance(e, IsmEdgeError) else _out_of_memory(reader, summary.frames)
        summary.stopped = "error"
        summary.error = str(err)
        summary.failure = err
    finally:
        for closable in (*sinks, purified, log):
            if closable is None:
                continue
            try:
                closable.close()
            except (IsmEdgeError, OSError) as e:
                if summary.failure is None:
                    err = e if isinstance(e, IsmEdgeError) else OutputError(f"closing an output failed: {e}")
                    summary.stopped, summary.error, summary.failure = "error", str(err), err
        summary.outputs = _written(log, sinks, purified)
        summary.signal = signal.Signals(received[0]).name if received else None
        summary.dropped = reader.dropped
        summary.reconnects = reader.reconnects
        summary.seconds = time.perf_counter() - started
        summary.labels = dict(labels)
        if latencies:
            summary.latency_p50_ms = float(np.percentile(latencies, 50))
            summary.latency_p99_ms = float(np.percentile(latencies, 99))
        if first_capture is not None and last_verdict is not None and last_verdict > first_capture:
            summary.fps = summary.frames / (last_verdict - first_capture)
    return summary


def _where(item: Captured | Skipped) -> dict[str, Any]:
    """The head of a log line: the frame's index, its file (image folders) and when it was read."""
    head: dict[str, Any] = {"frame": item.index}
    if item.name is not None:
        head["file"] = item.name
    head["time"] = round(item.wall_time, 6)
    return head


def _out_of_memory(reader: FrameReader, frames: int) -> IsmEdgeError:
    return IsmEdgeError(
        f"out of memory after {frames} frames of {reader.source.uri}: free memory, or judge smaller inputs "
        "(fewer tiles: --mode resize or a smaller --tile-grid; fewer frames held: a smaller --queue-size)"
    )


def _written(log: VerdictLog | None, sinks: Sequence[FrameSink], purified: ImageFolderOutput | None) -> list[dict[str, Any]]:
    """Per output with a file: what it is, where, how many frames are in it, and whether every write worked."""
    outputs: list[dict[str, Any]] = []
    if log is not None:
        outputs.append({"output": "log", "path": log.path, "frames": log.lines, "complete": not log.failed})
    for kind, sink in [*((s.kind, s) for s in sinks), ("purified", purified)]:
        if sink is not None and sink.path is not None:
            outputs.append({"output": kind, "path": str(sink.path), "frames": sink.frames, "complete": not sink.failed})
    return outputs
