"""The camera loop of ``ism-edge run``: capture → defend → log → render, and a summary at exit.

In the spirit of jetson-inference's examples: a reader thread captures (dropping the oldest
frames of a live source so latency never grows), the runtime judges each frame, every verdict is
appended to the JSON-lines log at once, and annotated frames go to a video file, an image
folder or a window. When frame N+1 is already waiting it is submitted before frame N is
collected, so on TensorRT its upload overlaps N's compute; when none is waiting (a live source
at its own pace), or N's work is already done (ONNX Runtime computes at submit), frame N is
answered at once rather than one capture later.

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
from ism_edge.verdict import Verdict


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


def run_camera_loop(
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
    stats = _Stats(RunSummary(source=str(reader.source.uri), backend=runtime.backend_name))
    outputs = _Outputs(log, sinks, purified)
    judge = _Judge(runtime, outputs, stats)
    received: list[int] = []
    try:
        with graceful_interrupt(stop) as received, reader:
            while (stopped := _stop_reason(stop, outputs, stats.taken, opts)) is None:
                if len(reader.queue) == 0 or judge.ready():
                    # No frame waiting (a live source at its own pace), or the work is done (ONNX
                    # Runtime computes at submit): answer now, not a capture later.
                    judge.answer()
                if (item := reader.get(stop=stop)) is None:
                    stopped = "interrupted" if stop.is_set() else "end"
                    break
                judge.take(item)
                stats.report(status, reader, opts.status_interval)
            judge.answer()
        stats.summary.stopped = stopped
    except (IsmEdgeError, MemoryError) as e:
        judge.abandon(e)
        stats.fail(e if isinstance(e, IsmEdgeError) else _out_of_memory(reader, stats.summary.frames))
    finally:
        if (failure := outputs.close()) is not None and stats.summary.failure is None:
            stats.fail(failure)
        stats.finish(reader, outputs.written(), received)
    return stats.summary


def _stop_reason(stop: threading.Event, outputs: _Outputs, taken: int, opts: RunOptions) -> str | None:
    """Why the run stops before reading another frame (see ``RunSummary.stopped``), or None to go on."""
    if stop.is_set():
        return "interrupted"
    if outputs.stop_requested:
        return "window"
    if opts.max_frames is not None and taken >= opts.max_frames:
        return "max-frames"
    return None


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


class _Stats:
    """The run's counts as it goes: kept in its :class:`RunSummary` (which the status callback
    sees), with the latencies, labels and times the summary's figures are computed from at the end."""

    def __init__(self, summary: RunSummary) -> None:
        self.summary = summary
        self.started = time.perf_counter()
        self.taken = 0  # frames handed to the runtime, judged or rejected: what max_frames counts
        self.fps = _Fps()
        self.latencies: list[float] = []
        self.labels: Counter[str] = Counter()
        self.first_capture: float | None = None
        self.last_verdict: float | None = None
        self._last_status = self.started

    def took(self, item: Captured) -> None:
        self.taken += 1
        if self.first_capture is None:
            self.first_capture = item.t_capture

    def judged(self, item: Captured, verdict: Verdict, now: float, latency: float) -> None:
        """Count a verdict that every output took."""
        self.last_verdict = now
        self.latencies.append(latency)
        start = item.t_capture if self.first_capture is None else self.first_capture
        self.summary.timeline.append((item.t_capture - start, latency))
        self.summary.frames += 1
        self.summary.flagged += int(verdict.flagged)
        self.labels[verdict.label] += 1

    def report(self, status: Callable[[RunSummary], None] | None, reader: FrameReader, interval: float) -> None:
        """Call ``status`` with the summary so far, at most once per ``interval`` seconds."""
        now = time.perf_counter()
        if status is None or now - self._last_status < interval:
            return
        self._last_status = now
        self.summary.dropped = reader.dropped
        self.summary.seconds = now - self.started
        status(self.summary)

    def fail(self, error: IsmEdgeError) -> None:
        self.summary.stopped, self.summary.error, self.summary.failure = "error", str(error), error

    def finish(self, reader: FrameReader, outputs: list[dict[str, Any]], received: list[int]) -> None:
        """Complete the summary: the reader's counts, the outputs, the signal, latency and FPS."""
        s = self.summary
        s.outputs = outputs
        s.signal = signal.Signals(received[0]).name if received else None
        s.dropped = reader.dropped
        s.reconnects = reader.reconnects
        s.seconds = time.perf_counter() - self.started
        s.labels = dict(self.labels)
        if self.latencies:
            s.latency_p50_ms = float(np.percentile(self.latencies, 50))
            s.latency_p99_ms = float(np.percentile(self.latencies, 99))
        if self.first_capture is not None and self.last_verdict is not None and self.last_verdict > self.first_capture:
            s.fps = s.frames / (self.last_verdict - self.first_capture)


class _Outputs:
    """Where verdicts go: the JSON-lines log, the annotated-frame sinks and the purified images.

    ``head``: fields that lead every log line (a multi-stream run's ``source`` and ``source_uri``)."""

    def __init__(self, log: VerdictLog | None, sinks: Sequence[FrameSink], purified: ImageFolderOutput | None,
                 head: dict[str, Any] | None = None) -> None:
        self.log, self.sinks, self.purified = log, sinks, purified
        self.head = head or {}

    @property
    def stop_requested(self) -> bool:
        """A window was closed."""
        return any(s.stop_requested for s in self.sinks)

    def verdict(self, item: Captured, verdict: Verdict, latency: float, fps: float | None) -> None:
        if self.log is not None:
            self.log.write({**self.head, **_where(item), "latency_ms": round(latency, 3), **verdict.to_json()})
        if self.sinks:
            image = annotate(item.image, verdict, fps=fps, frame=item.index)
            for sink in self.sinks:
                sink.write(image)
        if self.purified is not None and verdict.purified is not None:
            self.purified.write(verdict.purified)

    def skip(self, item: Captured | Skipped, reason: str) -> None:
        if self.log is not None:
            self.log.write({**self.head, **_where(item), "skipped": True, "error": reason})

    def close(self) -> IsmEdgeError | None:
        """Close every output; the first failure, if any (the others are already counted as failed writes)."""
        failure = None
        for closable in (*self.sinks, self.purified, self.log):
            if closable is None:
                continue
            try:
                closable.close()
            except (IsmEdgeError, OSError) as e:
                if failure is None:
                    failure = e if isinstance(e, IsmEdgeError) else OutputError(f"closing an output failed: {e}")
        return failure

    def written(self) -> list[dict[str, Any]]:
        """Per output with a file: what it is, where, how many frames are in it, and whether every write worked."""
        written: list[dict[str, Any]] = []
        if self.log is not None:
            written.append(
                {"output": "log", "path": self.log.path, "frames": self.log.lines, "complete": not self.log.failed}
            )
        for kind, sink in [*((s.kind, s) for s in self.sinks), ("purified", self.purified)]:
            if sink is not None and sink.path is not None:
                written.append(
                    {"output": kind, "path": str(sink.path), "frames": sink.frames, "complete": not sink.failed}
                )
        return written


class _Judge:
    """Hands frames to the runtime with at most one in flight: frame N+1 is submitted before frame N
    is collected (on TensorRT its upload overlaps N's compute), and every log line stays in frame order."""

    def __init__(self, runtime: DefenseRuntime, outputs: _Outputs, stats: _Stats) -> None:
        self.runtime, self.outputs, self.stats = runtime, outputs, stats
        self.in_flight: tuple[Captured, Pending] | None = None

    def take(self, item: Captured | Skipped) -> None:
        """Submit a frame and answer the one before it; a skipped item or a rejected frame is logged in its place."""
        if isinstance(item, Skipped):  # an unreadable file of a folder
            self.answer()
            self._skip(item, item.reason)
            return
        self.stats.took(item)
        try:
            pending = self.runtime.submit(item.image, purified=self.outputs.purified is not None)
        except FrameError as e:  # wrong shape, dtype, NaNs
            self.answer()
            self._skip(item, str(e))
            return
        previous, self.in_flight = self.in_flight, (item, pending)
        if previous is not None:
            self._finish(*previous)

    def ready(self) -> bool:
        """Whether the frame in flight is done (collecting it would not wait for the device)."""
        return self.in_flight is not None and self.runtime.ready(self.in_flight[1])

    def answer(self) -> None:
        """Collect the frame in flight, if any, and write its verdict."""
        previous, self.in_flight = self.in_flight, None
        if previous is not None:
            self._finish(*previous)

    def abandon(self, error: BaseException) -> None:
        """After ``error`` ended the run: answer the frame in flight unless an output failed (then
        nothing more is written), ignoring a second failure."""
        if not isinstance(error, OutputError):
            with contextlib.suppress(IsmEdgeError, MemoryError):
                self.answer()
        self.in_flight = None

    def _finish(self, item: Captured, pending: Pending) -> None:
        verdict = self.runtime.collect(pending)[0]
        now = time.perf_counter()
        latency = (now - item.t_capture) * 1e3
        self.outputs.verdict(item, verdict, latency, self.stats.fps.tick(now))
        self.stats.judged(item, verdict, now, latency)

    def _skip(self, item: Captured | Skipped, reason: str) -> None:
        self.stats.summary.skipped += 1
        self.outputs.skip(item, reason)


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
