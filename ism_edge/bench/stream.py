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
