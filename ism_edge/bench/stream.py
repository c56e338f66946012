"""Camera-rate benchmark: ``ism-edge run``'s loop on a video that behaves like a live camera.

A :class:`~ism_edge.sources.PacedSource` delivers a video file's frames at its frame rate
(decoded ahead, released on schedule) and counts as *live*, so the reader thread keeps only the
newest frames and counts the ones it drops, exactly as with a camera. :func:`run_stream_bench` runs
:func:`ism_edge.camera_loop.run_camera_loop` on it for a fixed time (verdicts logged to a JSON-lines
file, no window or video output) and reports sustained FPS, end-to-end latency (capture →
verdict) p50/p99, dropped frames, and the same per time window, so a latency that grows over
the run is visible.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ism_edge.bench.frames import DEFAULT_FRAME_SIZE, write_video
from ism_edge.sources import PacedSource, open_source


def latency_windows(timeline: list[tuple[float, float]], window_s: float) -> list[dict[str, Any]]:
    """Per complete ``window_s``-second window of capture time: frames judged, FPS, latency
    p50/p99/max (a run shorter than one window gives one window over the whole run)."""
    if not timeline:
        return []
    t = np.array([p[0] for p in timeline])
    lat = np.array([p[1] for p in timeline])
    period = float(np.median(np.diff(t))) if len(t) > 1 else 0.0
    duration = float(t.max()) + period
    count = int(duration / window_s + 1e-9)
    bounds = [(k * window_s, (k + 1) * window_s) for k in range(count)] or [(0.0, duration)]
    windows = []
    for lo, hi in bounds:
        sel = (t >= lo) & (t < hi)
        if not sel.any():
            continue
        windows.append({
            "start_s": lo,
            "frames": int(sel.sum()),
            "fps": float(sel.sum() / (hi - lo)) if hi > lo else None,
            "latency_p50_ms": float(np.percentile(lat[sel], 50)),
            "latency_p99_ms": float(np.percentile(lat[sel], 99)),
            "latency_max_ms": float(lat[sel].max()),
        })
    return windows


def latency_trend(timeline: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of latency against capture time, in ms per minute (≈ 0: no growth)."""
    if len(timeline) < 3:
        return None
    t = np.array([p[0] for p in timeline])
    lat = np.array([p[1] for p in timeline])
    if np.ptp(t) == 0:
        return None
    return float(np.polyfit(t, lat, 1)[0] * 60.0)


def run_stream_bench(
    engine_dir: str | Path,
    *,
    mode: str = "resize",
    seconds: float = 120.0,
    fps: float = 30.0,
    frame_size: tuple[int, int] = DEFAULT_FRAME_SIZE,
    video: str | Path | None = None,
    threads: int | None = None,
    spinning: bool | None = None,
    backend: str | None = None,
    tile_grid: tuple[int, int] | None = None,
    window_s: float = 10.0,
    queue_size: int = 2,
    photos: list[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Run the camera loop on a paced ``video`` (default: a 10 s clip of :func:`camera_frames`
    at ``frame_size`` and ``fps``, looped) for ``seconds`` and return the report (JSON-ready)."""
    from ism_edge.camera_loop import run_camera_loop
    from ism_edge.outputs import VerdictLog
    from ism_edge.runtime import DefenseRuntime
    from ism_edge.sources import FrameReader, ReaderOptions

    if seconds <= 0 or fps <= 0 or window_s <= 0:
        raise ValueError("seconds, fps and window_s must be > 0")
    source_name = str(video) if video is not None else f"a generated 10 s clip of camera_frames at {fps:g} fps, looped"
    with tempfile.TemporaryDirectory(prefix="ism-edge-bench-") as tmp:
        if video is None:
            video = write_video(Path(tmp) / "camera.mp4", int(round(10 * fps)), fps, frame_size, photos)
        runtime = DefenseRuntime(engine_dir, backend=backend, mode=mode, tile_grid=tile_grid, threads=threads,
                                 spinning=spinning, color_order="BGR")
        with runtime:
            runtime.warmup()
            source = PacedSource(open_source(str(video)), fps, loop=True)
            source.open()
            reader = FrameReader(source, ReaderOptions(queue_size=queue_size))
            log = VerdictLog(Path(tmp) / "verdicts.jsonl")
            stop = threading.Event()
            timer = threading.Timer(seconds, stop.set)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            timer.start()
            try:
                summary = run_camera_loop(runtime, reader, log=log, stop=stop)
            finally:
                timer.cancel()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            describe = runtime.describe()
    if summary.failure is not None:
        raise summary.failure
    captured = reader.frames_read
    return {
        "engine_dir": str(engine_dir),
        "runtime": describe,
        "mode": mode,
        "tile_grid": None if tile_grid is None else list(tile_grid),
        "source": {"video": source_name, "fps": fps, "frame_size": list(frame_size), "paced": True, "loop": True},
        "seconds": wall,
        "frames_captured": captured,
        "frames_judged": summary.frames,
        "dropped": summary.dropped,
        "sustained_fps": summary.fps,
        "latency_ms": {
            "p50": summary.latency_p50_ms,
            "p99": summary.latency_p99_ms,
            "max": max((p[1] for p in summary.timeline), default=None),
        },
        "latency_trend_ms_per_min": latency_trend(summary.timeline),
        "windows": latency_windows(summary.timeline, window_s),
        "process_cpu_percent": 100.0 * cpu / wall if wall > 0 else None,
        "queue_size": queue_size,
        "threads": threads,
        "spinning": spinning,
    }


def holds(report: dict[str, Any], fps: float) -> bool:
    """Whether a multi-stream run kept up: no frame dropped, every stream judged at ≥ 97 % of ``fps``
    (the pacing's start-up and the last frame in flight cost a little), and p99 under one frame period."""
    p99 = report["latency_ms"]["p99"]
    return (report["dropped"] == 0 and p99 is not None and p99 < 1e3 / fps
            and all(s["fps"] is not None and s["fps"] >= 0.97 * fps for s in report["streams"]))


def run_multi_stream_bench(
    engine_dir: str | Path,
    streams: int,
    *,
    mode: str = "resize",
    seconds: float = 120.0,
    fps: float = 30.0,
    frame_size: tuple[int, int] = DEFAULT_FRAME_SIZE,
    video: str | Path | None = None,
    threads: int | None = None,
    spinning: bool | None = None,
    backend: str | None = None,
    tile_grid: tuple[int, int] | None = None,
    window_s: float = 10.0,
    queue_size: int = 2,
    batch_timeout: float | None = None,
    photos: list[np.ndarray] | None = None,
) -> dict[str, Any]:
    """``streams`` paced copies of ``video`` (each its own decoder and reader thread, as N cameras)
    through :class:`ism_edge.multi_stream.MultiStream` and one runtime for ``seconds``: per stream
    its FPS, latency p50/p99 and drops; in total the same, the batches, the process's CPU use and
    the latency per window and its trend."""
    from ism_edge.multi_stream import BATCH_TIMEOUT, MultiStream, run_multi_stream
    from ism_edge.outputs import VerdictLog
    from ism_edge.runtime import DefenseRuntime
    from ism_edge.sources import ReaderOptions

    if streams < 1 or seconds <= 0 or fps <= 0 or window_s <= 0:
        raise ValueError("streams must be >= 1 and seconds, fps and window_s > 0")
    timeout = BATCH_TIMEOUT if batch_timeout is None else batch_timeout
    source_name = str(video) if video is not None else f"a generated 10 s clip of camera_frames at {fps:g} fps, looped"
    with tempfile.TemporaryDirectory(prefix="ism-edge-bench-") as tmp:
        if video is None:
            video = write_video(Path(tmp) / "camera.mp4", int(round(10 * fps)), fps, frame_size, photos)
        runtime = DefenseRuntime(engine_dir, backend=backend, mode=mode, tile_grid=tile_grid, threads=threads,
                                 spinning=spinning, color_order="BGR")
        with runtime:
            runtime.warmup(streams)
            sources = [PacedSource(open_source(str(video)), fps, loop=True) for _ in range(streams)]
            stop = threading.Event()
            multi = MultiStream(runtime, sources, reader_options=ReaderOptions(queue_size=queue_size),
                                batch_timeout=timeout, stop=stop)
            timer = threading.Timer(seconds, stop.set)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            timer.start()
            try:
                summary = run_multi_stream(runtime, multi, log=VerdictLog(Path(tmp) / "verdicts.jsonl"))
            finally:
                timer.cancel()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            describe = runtime.describe()
            captured = [s.reader.frames_read if s.reader is not None else 0 for s in multi.streams]
    if summary.failure is not None:
        raise summary.failure
    t = summary.total
    per_stream = [
        {"frames_captured": c, "frames_judged": s.frames, "dropped": s.dropped, "fps": s.fps,
         "latency_p50_ms": s.latency_p50_ms, "latency_p99_ms": s.latency_p99_ms}
        for s, c in zip(summary.sources, captured, strict=True)
    ]
    report: dict[str, Any] = {
        "engine_dir": str(engine_dir),
        "runtime": describe,
        "mode": mode,
        "tile_grid": None if tile_grid is None else list(tile_grid),
        "source": {"video": source_name, "fps": fps, "frame_size": list(frame_size), "paced": True, "loop": True},
        "streams_count": streams,
        "seconds": wall,
        "frames_captured": sum(captured),
        "frames_judged": t.frames,
        "dropped": t.dropped,
        "total_fps": t.fps,
        "latency_ms": {"p50": t.latency_p50_ms, "p99": t.latency_p99_ms,
                       "max": max((p[1] for p in t.timeline), default=None)},
        "latency_trend_ms_per_min": latency_trend(t.timeline),
        "windows": latency_windows(t.timeline, window_s),
        "batches": summary.batches,
        "mean_batch": summary.mean_batch,
        "batch_timeout_ms": timeout * 1e3,
        "process_cpu_percent": 100.0 * cpu / wall if wall > 0 else None,
        "streams": per_stream,
        "queue_size": queue_size,
        "threads": threads,
        "spinning": spinning,
    }
    report["holds"] = holds(report, fps)
    return report


def find_max_streams(run: Any, fps: float, *, limit: int = 64, say: Any = None) -> dict[str, Any]:
    """The largest N for which ``run(N)`` (a :func:`run_multi_stream_bench` report) :func:`holds`:
    N doubles from 1 until a run fails (or ``limit``), then the gap is bisected. Returns
    ``{"max_streams": N or 0, "trials": [report, ...]}`` in the order run."""
    trials: list[dict[str, Any]] = []

    def trial(n: int) -> bool:
        if say is not None:
            say(f"{n} stream(s) ...")
        report = run(n)
        trials.append(report)
        return bool(report["holds"])

    good, bad = 0, None
    n = 1
    while n <= limit:
        if trial(n):
            good, n = n, n * 2
        else:
            bad = n
            break
    if bad is None:
        return {"max_streams": good, "trials": trials}
    while bad - good > 1:
        mid = (good + bad) // 2
        if trial(mid):
            good = mid
        else:
            bad = mid
    return {"max_streams": good, "trials": trials}
