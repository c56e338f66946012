"""Several cameras through one engine chain: ``ism-edge run ENGINE_DIR INPUT [INPUT ...]``.

An edge box serving N cameras should not run N processes with N copies of the engines: as
DeepStream's stream muxer does, frames of every source are batched into one inference call.
Each source keeps what a single-source run has (``ism_edge.sources``): its own reader thread, a
drop-oldest queue for live sources, reconnection with backoff, and stall detection. A batcher
takes the newest frame of every live source that has one (the next frame of a file or folder,
which are never dropped) and runs them as one :meth:`DefenseRuntime.submit_batch`. Once the
first frame of a batch is taken, the batch waits at most ``batch_timeout`` seconds for the other
sources (nvstreammux's ``batched-push-timeout``), so a slow, stalled or dead source never holds
the others back.

A source that cannot be opened is reported and, when live, retried in the background with the
reconnection backoff while the others run; a file or folder that cannot be opened, a source that
ends, stalls or is lost for good leaves the run, which goes on with the others until every
source is done.

From Python (a robotics node with several image topics can wrap its topics as
:class:`~ism_edge.sources.FrameSource` subclasses)::

    from ism_edge import DefenseRuntime
    from ism_edge.multi_stream import MultiStream

    with DefenseRuntime("engines/cifar10") as runtime:
        for source, frame_index, verdict in MultiStream(runtime, ["rtsp://cam1/s", "rtsp://cam2/s"]):
            ...

:func:`run_multi_stream` is the loop of the CLI around it: the log, the annotated outputs and
the purified images per source, Ctrl-C, and a summary per source and in total.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from ism_edge.camera_loop import RunSummary, _Fps, _Outputs, _Stats, graceful_interrupt
from ism_edge.errors import FrameError, IsmEdgeError, OutputError, SourceError
from ism_edge.mosaic import Mosaic
from ism_edge.outputs import FrameSink, ImageFolderOutput, VerdictLog
from ism_edge.runtime import DefenseRuntime, Pending
from ism_edge.sources import Captured, FrameReader, FrameSource, ReaderOptions, Skipped, SourceURI, make_source
from ism_edge.verdict import Verdict

BATCH_TIMEOUT = 0.02  # s a batch waits for the other sources after its first frame (below one 30 fps frame)
_MOSAIC_STATES = {"retrying": "no signal", "ended": "ended", "max-frames": "ended", "failed": "failed"}  # its cell


# -- what the loop yields -------------------------------------------------------------------------


class StreamVerdict(NamedTuple):
    """One judged frame: the source's index (its position in the list given), the frame's index
    in that source, and the verdict."""

    source: int
    frame_index: int
    verdict: Verdict


@dataclass(frozen=True)
class Judged:
    """A judged frame with what its outputs need: the captured frame and its latency (ms, capture → verdict).

    ``last_of_batch``: no other frame of its batch follows (a mosaic is written once per batch)."""

    source: int
    item: Captured
    verdict: Verdict
    latency_ms: float
    t_verdict: float  # time.perf_counter() when the verdict was known
    last_of_batch: bool = True


@dataclass(frozen=True)
class SkippedItem:
    """A frame the runtime rejected, or an unreadable file of a folder, in its place in the source."""

    source: int
    item: Captured | Skipped
    reason: str


@dataclass(frozen=True)
class SourceEvent:
    """A change of a source's state: ``retrying`` (it could not be opened yet), ``opened`` (after
    retries), ``ended`` (a file or folder), ``max-frames``, ``failed`` (``error`` says why)."""

    source: int
    kind: str
    message: str
    error: SourceError | None = None


Event = Judged | SkippedItem | SourceEvent


# -- one source -----------------------------------------------------------------------------------


class _Stream:
    """A source in the run: its reader (once open), its state and its counts."""

    def __init__(self, index: int, source: FrameSource) -> None:
        self.index = index
        self.source = source
        self.uri = str(source.uri)
        self.reader: FrameReader | None = None
        self.state = "opening"  # opening | running | ended | max-frames | failed
        self.error: SourceError | None = None
        self.taken = 0  # frames handed to the runtime (what max_frames counts)
        self.passed_over = 0  # live frames left in the queue when a newer one was taken
        self.last_item = time.monotonic()
        self.grace = True
        self.seen_reconnects = 0
        self.opener: threading.Thread | None = None

    @property
    def active(self) -> bool:
        """Still delivering, or may deliver once it opens."""
        return self.state in ("opening", "running")

    @property
    def dropped(self) -> int:
        return (self.reader.dropped if self.reader is not None else 0) + self.passed_over

    @property
    def reconnects(self) -> int:
        return self.reader.reconnects if self.reader is not None else 0


class MultiStream:
    """Runs several sources through one :class:`DefenseRuntime`, batching their frames.

    ``sources``: URIs (as for ``ism-edge run``) or :class:`FrameSource` objects, not opened yet.
    Iterate for :class:`StreamVerdict` ``(source, frame_index, verdict)``; :meth:`events` also
    yields the frames and their latencies, skipped frames and source changes. ``max_frames``
    stops each source after that many frames; ``stop`` (an event, e.g. set by a signal handler or
    a timer) ends the run after the batch in flight is answered, and is set when the run ends.
    Every source is first opened on the caller's thread (when iteration starts); a live source that
    fails is retried on a thread of its own with the reconnection backoff of ``reader_options``.
    """

    def __init__(
        self,
        runtime: DefenseRuntime,
        sources: Sequence[FrameSource | SourceURI | str | int | os.PathLike[str]],
        *,
        reader_options: ReaderOptions | None = None,
        batch_timeout: float = BATCH_TIMEOUT,
        max_frames: int | None = None,
        purified: bool = False,
        stop: threading.Event | None = None,
    ) -> None:
        if not sources:
            raise ValueError("give at least one source")
        if batch_timeout < 0:
            raise ValueError(f"batch_timeout must be >= 0 seconds, got {batch_timeout}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.runtime = runtime
        self.options = reader_options or ReaderOptions()
        self.batch_timeout = batch_timeout
        self.max_frames = max_frames
        self.purified = purified
        self.stop = stop or threading.Event()
        timeout = self.options.stall_timeout
        self.streams = [
            _Stream(i, s if isinstance(s, FrameSource)
                    else make_source(s if isinstance(s, (SourceURI, str, int)) else os.fspath(s), read_timeout=timeout))
            for i, s in enumerate(sources)
        ]
        self._arrived = threading.Condition()
        self._events: list[Event] = []  # source changes reported by opener threads, handed out by the loop
        self._seq = 0  # items queued by any reader so far: a wake-up is never missed between a poll and a wait
        self._started = False
        self.interrupted = False  # stop was set before every source was done
        self.batches = 0
        self.batch_sizes: list[int] = []

    @property
    def uris(self) -> list[str]:
        return [s.uri for s in self.streams]

    def __iter__(self) -> Iterator[StreamVerdict]:
        for event in self.events():
            if isinstance(event, Judged):
                yield StreamVerdict(event.source, event.item.index, event.verdict)

    # -- the loop ---------------------------------------------------------------------------------
    def events(self) -> Generator[Event, None, None]:
        """Run until every source is done or ``stop`` is set; yields what happened, in order per source.

        Raises only what ends every source at once (an :class:`IsmEdgeError` of the runtime,
        ``MemoryError``); the readers are stopped whichever way the iteration ends.
        """
        if self._started:
            raise RuntimeError("a MultiStream runs once; make a new one")
        self._started = True
        in_flight: tuple[list[tuple[_Stream, Captured]], Pending] | None = None
        try:
            for stream in self.streams:
                yield from self._first_open(stream)
            while not self.stop.is_set():
                yield from self._take_events()
                if in_flight is not None and (not self._any_waiting() or self.runtime.ready(in_flight[1])):
                    # Nothing waiting, or the work is done (ONNX Runtime computes at submit): answer
                    # now, not after the next batch's gathering and compute.
                    yield from self._answer(in_flight)
                    in_flight = None
                picked, skips = self._gather()
                yield from self._take_events()
                yield from skips
                if not picked:
                    if not any(s.active for s in self.streams):
                        break
                    continue
                submitted, rejected = self._submit(picked)
                yield from rejected
                if in_flight is not None:
                    yield from self._answer(in_flight)
                in_flight = submitted
            self.interrupted = self.stop.is_set()
            if in_flight is not None:
                yield from self._answer(in_flight)
                in_flight = None
            yield from self._take_events()
        finally:
            if in_flight is not None:  # the consumer stopped early or a failure: keep the runtime consistent
                with contextlib.suppress(IsmEdgeError, MemoryError, RuntimeError):
                    self.runtime.collect(in_flight[1])
            self._close()

    def _close(self) -> None:
        self.stop.set()
        with self._arrived:
            self._arrived.notify_all()
        for stream in self.streams:
            if stream.opener is not None:
                stream.opener.join(1.0)
        for stream in self.streams:
            if stream.reader is not None:
                stream.reader.stop(timeout=0.5)
            elif stream.state != "opening":
                stream.source.close()

    def _notify(self) -> None:
        with self._arrived:
            self._seq += 1
            self._arrived.notify_all()

    def _post(self, event: SourceEvent) -> None:
        with self._arrived:
            self._events.append(event)
            self._arrived.notify_all()

    def _take_events(self) -> list[Event]:
        with self._arrived:
            events, self._events = self._events, []
        return events

    # -- opening ----------------------------------------------------------------------------------
    def _start(self, stream: _Stream) -> None:
        stream.reader = FrameReader(stream.source, self.options, on_item=self._notify)
        stream.last_item = time.monotonic()
        stream.state = "running"
        stream.reader.start()

    def _first_open(self, stream: _Stream) -> Iterator[Event]:
        """Open a source on the caller's thread; a live one that fails is retried in the background."""
        try:
            stream.source.open()
        except SourceError as e:
            if not stream.source.live or self.options.reconnect_attempts == 0:
                yield self._fail(stream, e)
                return
            yield SourceEvent(stream.index, "retrying", f"{e}; retrying while the other sources run")
            stream.opener = threading.Thread(target=self._retry_open, args=(stream, str(e)),
                                             name=f"ism-edge opener {stream.uri}", daemon=True)
            stream.opener.start()
            return
        self._start(stream)

    def _retry_open(self, stream: _Stream, first: str) -> None:
        started, attempts, last = time.monotonic(), 1, first
        for delay in self.options.delays():
            if self.stop.wait(delay):
                return
            attempts += 1
            try:
                stream.source.open()
            except SourceError as e:
                last = str(e)
                continue
            if self.stop.is_set():
                stream.source.close()
                return
            self._start(stream)
            self._post(SourceEvent(stream.index, "opened", f"{stream.uri} opened after {attempts} attempts"))
            return
        error = SourceError(f"{stream.uri} could not be opened in {attempts} attempts over "
                            f"{time.monotonic() - started:.1f} s (last: {last}): check the camera or stream")
        self._post(self._fail(stream, error))

    def _fail(self, stream: _Stream, error: SourceError) -> SourceEvent:
        stream.state, stream.error = "failed", error
        return SourceEvent(stream.index, "failed", str(error), error)

    # -- batching ---------------------------------------------------------------------------------
    def _any_waiting(self) -> bool:
        return any(s.reader is not None and s.state == "running" and len(s.reader.queue) > 0 for s in self.streams)

    def _take(self, stream: _Stream, skips: list[Event]) -> Captured | None:
        """The frame to judge of ``stream`` now: the newest one of a live source (the older ones
        are counted as dropped), the next one of a file or folder; its end, loss and stalls."""
        reader = stream.reader
        if reader is None or stream.state != "running":
            return None
        taken: Captured | None = None
        try:
            while (item := reader.poll()) is not None:
                stream.last_item, stream.grace = time.monotonic(), True
                if isinstance(item, Skipped):
                    skips.append(SkippedItem(stream.index, item, item.reason))
                    continue
                if taken is not None:
                    stream.passed_over += 1
                taken = item
                if not reader.drop:
                    break
        except SourceError as e:
            skips.append(self._fail(stream, e))
            return taken
        if reader.finished and taken is None:
            stream.state = "ended"
            skips.append(SourceEvent(stream.index, "ended", f"{stream.uri} ended"))
        elif taken is None:
            self._check_stall(stream, skips)
        return taken

    def _check_stall(self, stream: _Stream, events: list[Event]) -> None:
        """As :meth:`FrameReader.get` does for one source: no frame within the stall timeout (and,
        for a live source that may be reopened, a second one to let its read time out) fails it."""
        reader = stream.reader
        assert reader is not None
        now = time.monotonic()
        if reader.reconnecting or reader.reconnects != stream.seen_reconnects:
            stream.seen_reconnects, stream.last_item = reader.reconnects, now
            return
        wait = self.options.stall_timeout
        if now - stream.last_item < wait:
            return
        if stream.grace and not stream.source.finite and self.options.reconnect_attempts > 0:
            stream.grace, stream.last_item = False, now
            return
        reader.stop(timeout=0.0)
        events.append(self._fail(stream, SourceError(
            f"{stream.uri} delivered no frame for {wait:g} s (stalled): check the camera or stream, "
            "or raise --stall-timeout")))

    def _gather(self) -> tuple[list[tuple[_Stream, Captured]], list[Event]]:
        """The next batch: a frame of each running source that has one, waiting up to
        ``batch_timeout`` after the first for the others; and what happened meanwhile."""
        picked: dict[int, Captured] = {}
        events: list[Event] = []
        deadline: float | None = None
        while not self.stop.is_set():
            with self._arrived:
                seen = self._seq
            for stream in self.streams:
                if stream.index in picked or (self.max_frames is not None and stream.taken >= self.max_frames):
                    continue
                if (item := self._take(stream, events)) is not None:
                    picked[stream.index] = item
                    if deadline is None:
                        deadline = time.monotonic() + self.batch_timeout
            missing = [s for s in self.streams if s.state == "running" and s.index not in picked]
            if picked and (not missing or (deadline is not None and time.monotonic() >= deadline)):
                break
            if not any(s.active for s in self.streams) or events:
                break  # every source is done; or report what happened before waiting on
            wait = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
            with self._arrived:
                if not self._events and self._seq == seen:
                    self._arrived.wait(wait)
                if self._events:
                    break
        batch = [(self.streams[i], item) for i, item in sorted(picked.items())]
        for stream, _ in batch:
            stream.taken += 1
            if self.max_frames is not None and stream.taken >= self.max_frames:
                stream.state = "max-frames"
                if stream.reader is not None:
                    stream.reader.stop(timeout=0.0)
                events.append(SourceEvent(stream.index, "max-frames", f"{stream.uri}: {self.max_frames} frames"))
        return batch, events

    def _submit(
        self, batch: list[tuple[_Stream, Captured]]
    ) -> tuple[tuple[list[tuple[_Stream, Captured]], Pending] | None, list[Event]]:
        """Start the chain on a batch; a frame the runtime rejects is reported as skipped and the rest go on."""
        try:
            return (batch, self.runtime.submit_batch([c.image for _, c in batch], purified=self.purified)), []
        except FrameError:
            pass
        from ism_edge.preprocess import check_frame

        good: list[tuple[_Stream, Captured]] = []
        rejected: list[Event] = []
        for stream, item in batch:
            try:
                check_frame(item.image)
            except FrameError as e:
                rejected.append(SkippedItem(stream.index, item, str(e)))
                continue
            good.append((stream, item))
        if not good:
            return None, rejected
        return (good, self.runtime.submit_batch([c.image for _, c in good], purified=self.purified)), rejected

    def _answer(self, in_flight: tuple[list[tuple[_Stream, Captured]], Pending]) -> Iterator[Judged]:
        batch, pending = in_flight
        verdicts = self.runtime.collect(pending)
        now = time.perf_counter()
        self.batches += 1
        self.batch_sizes.append(len(batch))
        for k, ((stream, item), verdict) in enumerate(zip(batch, verdicts, strict=True)):
            yield Judged(stream.index, item, verdict, (now - item.t_capture) * 1e3, now, k == len(batch) - 1)


# -- the CLI's loop around it ---------------------------------------------------------------------


@dataclass
class MultiRunSummary:
    """A multi-stream run: one :class:`RunSummary` per source, and the totals over them.

    ``total.latency_*`` and ``total.fps`` are over every frame of every source; ``batches`` and
    ``mean_batch`` say how many frames each inference call held.
    """

    sources: list[RunSummary]
    total: RunSummary
    batches: int = 0
    mean_batch: float | None = None
    failure: IsmEdgeError | None = field(default=None, repr=False)

    @property
    def stopped(self) -> str:
        return self.total.stopped

    def to_json(self) -> dict[str, Any]:
        return {
            "sources": [{"index": i, **s.to_json()} for i, s in enumerate(self.sources)],
            "total": self.total.to_json(),
            "batches": self.batches,
            "mean_batch": None if self.mean_batch is None else round(self.mean_batch, 3),
        }


@dataclass
class SourceOutputs:
    """The annotated-frame sinks and the purified-image folder of one source."""

    sinks: Sequence[FrameSink] = ()
    purified: ImageFolderOutput | None = None


def run_multi_stream(
    runtime: DefenseRuntime,
    multi: MultiStream,
    *,
    log: VerdictLog | None = None,
    outputs: Sequence[SourceOutputs] | None = None,
    on_event: Callable[[SourceEvent], None] | None = None,
    status: Callable[[MultiRunSummary], None] | None = None,
    status_interval: float = 1.0,
    mosaic: Mosaic | None = None,
) -> MultiRunSummary:
    """The loop of ``ism-edge run`` with several inputs: every verdict to the log (with its
    ``source`` and ``source_uri``) and to its source's outputs, until every source is done,
    Ctrl-C (every verdict already computed is written), a closed window or a failed output.

    ``mosaic``: also one tiled picture of every source (:class:`ism_edge.mosaic.Mosaic`, one cell
    per source in order), written once per batch after the batch's verdicts; a source that ends
    or fails shows that in its cell.

    A source that fails leaves the run and is reported through ``on_event``; its error is the
    summary's ``failure`` at the end (after everything else is written). The log, the sinks and
    the mosaic are closed here.
    """
    n = len(multi.streams)
    per_source = list(outputs) if outputs is not None else [SourceOutputs() for _ in range(n)]
    if len(per_source) != n:
        raise ValueError(f"{len(per_source)} outputs for {n} sources")
    if mosaic is not None and len(mosaic.uris) != n:
        raise ValueError(f"a mosaic of {len(mosaic.uris)} cells for {n} sources")
    outs = [_Outputs(log, [*o.sinks, *([] if mosaic is None else [mosaic.cell(i)])], o.purified,
                     head={"source": i, "source_uri": multi.streams[i].uri})
            for i, o in enumerate(per_source)]
    stats = [_Stats(RunSummary(source=s.uri, backend=runtime.backend_name)) for s in multi.streams]
    total = _Stats(RunSummary(source=f"{n} sources", backend=runtime.backend_name))
    fps = [_Fps() for _ in range(n)]
    received: list[int] = []
    result = MultiRunSummary([s.summary for s in stats], total.summary)
    source_failure: SourceError | None = None
    last_status = time.perf_counter()
    stopped = "end"
    events = multi.events()
    try:
        with graceful_interrupt(multi.stop) as received:
            for event in events:
                if isinstance(event, Judged):
                    out, st = outs[event.source], stats[event.source]
                    st.took(event.item)
                    total.took(event.item)
                    out.verdict(event.item, event.verdict, event.latency_ms, fps[event.source].tick(event.t_verdict))
                    st.judged(event.item, event.verdict, event.t_verdict, event.latency_ms)
                    total.judged(event.item, event.verdict, event.t_verdict, event.latency_ms)
                    if mosaic is not None and event.last_of_batch:
                        mosaic.write()
                elif isinstance(event, SkippedItem):
                    stats[event.source].summary.skipped += 1
                    total.summary.skipped += 1
                    outs[event.source].skip(event.item, event.reason)
                else:
                    if event.kind == "failed":
                        stats[event.source].fail(event.error or SourceError(event.message))
                        source_failure = source_failure or event.error
                    elif event.kind == "max-frames":
                        stats[event.source].summary.stopped = "max-frames"
                    if mosaic is not None and event.kind in _MOSAIC_STATES:
                        mosaic.mark(event.source, _MOSAIC_STATES[event.kind])
                    elif mosaic is not None and event.kind == "opened":
                        mosaic.unmark(event.source)
                    if on_event is not None:
                        on_event(event)
                if any(o.stop_requested for o in outs) or (mosaic is not None and mosaic.stop_requested):
                    stopped = "window"
                    multi.stop.set()
                now = time.perf_counter()
                if status is not None and now - last_status >= status_interval:
                    last_status = now
                    total.summary.seconds = now - total.started
                    total.summary.dropped = sum(s.dropped for s in multi.streams)
                    status(result)
        if stopped == "end" and (received or multi.interrupted):
            stopped = "interrupted"
    except (IsmEdgeError, MemoryError) as e:
        error = e if isinstance(e, IsmEdgeError) else IsmEdgeError(
            f"out of memory after {total.summary.frames} frames of {n} sources: free memory, or judge smaller "
            "inputs (--mode resize, a smaller --tile-grid, fewer sources)")
        total.fail(error)
        stopped = "error"
    finally:
        events.close()  # the readers stop; a batch still in flight is collected and not written
        close_failure = _close_all(outs, mosaic)
        _finish(result, multi, stats, total, outs, received, stopped)
        if mosaic is not None:
            result.total.outputs += mosaic.written()
        if result.total.failure is None and (close_failure or source_failure) is not None:
            failure = close_failure or source_failure
            assert failure is not None
            if close_failure is not None:
                total.fail(close_failure)
            else:
                result.total.error, result.total.failure = str(failure), failure
        result.failure = result.total.failure
    return result


def _close_all(outs: list[_Outputs], mosaic: Mosaic | None) -> IsmEdgeError | None:
    failure = None
    for out in outs:
        failure = out.close() or failure
    if mosaic is not None:
        try:
            mosaic.close()
        except (IsmEdgeError, OSError) as e:
            failure = failure or (e if isinstance(e, IsmEdgeError) else OutputError(f"closing the mosaic failed: {e}"))
    return failure


def _finish(result: MultiRunSummary, multi: MultiStream, stats: list[_Stats], total: _Stats, outs: list[_Outputs],
            received: list[int], stopped: str) -> None:
    """Complete the per-source and total summaries (the log appears once, in the total's outputs)."""
    sig = signal.Signals(received[0]).name if received else None
    log_entries: list[dict[str, Any]] = []
    for stream, st, out in zip(multi.streams, stats, outs, strict=True):
        s = st.summary
        written = out.written()
        log_entries = [w for w in written if w["output"] == "log"] or log_entries
        s.outputs = [w for w in written if w["output"] != "log"]
        s.dropped, s.reconnects = stream.dropped, stream.reconnects
        if s.stopped == "end" and stream.state not in ("ended", "max-frames", "failed"):
            s.stopped = stopped
        s.signal = sig
        _figures(st)
    t = total.summary
    if t.stopped == "end":
        t.stopped = stopped
    t.outputs = log_entries + [w for s in result.sources for w in s.outputs]
    t.signal = sig
    t.dropped = sum(s.dropped for s in result.sources)
    t.reconnects = sum(s.reconnects for s in result.sources)
    _figures(total)
    result.batches = multi.batches
    result.mean_batch = float(np.mean(multi.batch_sizes)) if multi.batch_sizes else None


def _figures(st: _Stats) -> None:
    s = st.summary
    s.seconds = time.perf_counter() - st.started
    s.labels = dict(st.labels)
    if st.latencies:
        s.latency_p50_ms = float(np.percentile(st.latencies, 50))
        s.latency_p99_ms = float(np.percentile(st.latencies, 99))
    if st.first_capture is not None and st.last_verdict is not None and st.last_verdict > st.first_capture:
        s.fps = s.frames / (st.last_verdict - st.first_capture)
