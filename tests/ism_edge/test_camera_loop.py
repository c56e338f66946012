"""The run loop: one log line per frame, outputs, max-frames, skips, stalls, Ctrl-C, summary."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from ism_edge import DefenseRuntime
from ism_edge.camera_loop import RunOptions, graceful_interrupt, run_camera_loop
from ism_edge.errors import SourceError
from ism_edge.outputs import ImageFolderOutput, VerdictLog, VideoFileOutput
from ism_edge.sources import FrameReader, ReaderOptions, open_source
from tests.ism_edge.conftest import ScriptedSource, count_video_frames


@pytest.fixture(scope="module")
def runtime(engine_dir: Path) -> DefenseRuntime:
    with DefenseRuntime(engine_dir) as rt:
        yield rt


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_frame_is_logged_and_drawn(runtime: DefenseRuntime, sample_video: Path, tmp_path: Path) -> None:
    log, video = tmp_path / "v.jsonl", tmp_path / "annotated.mp4"
    summary = run_camera_loop(
        runtime, FrameReader(open_source(sample_video)), log=VerdictLog(log), sinks=[VideoFileOutput(video, fps=10)],
        purified=ImageFolderOutput(tmp_path / "purified"),
    )  # fmt: skip
    records = read_log(log)
    assert summary.failure is None and summary.stopped == "end"
    assert summary.frames == len(records) == 12 == count_video_frames(video)
    assert [r["frame"] for r in records] == list(range(12))
    assert all(r["frame_size"] == [120, 160] and r["latency_ms"] > 0 for r in records)
    assert summary.flagged == sum(r["flagged"] for r in records)
    assert sum(summary.labels.values()) == 12
    assert summary.latency_p50_ms is not None and summary.latency_p99_ms is not None
    assert 0 < summary.latency_p50_ms <= summary.latency_p99_ms
    assert summary.fps is not None and summary.fps > 0
    assert summary.dropped == 0 and summary.skipped == 0
    assert len(list((tmp_path / "purified").glob("*.jpg"))) == 12
    assert json.loads(json.dumps(summary.to_json()))["frames"] == 12


def test_a_frame_done_at_submit_is_answered_before_the_next_is_submitted(
    runtime: DefenseRuntime, sample_video: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file always has its next frame waiting; on ONNX Runtime the frame is already computed, so
    holding it in flight would only add the next frame's work to its latency."""
    submitted: list[int] = []
    collected_after: list[int] = []
    real_submit, real_collect = runtime.submit, runtime.collect

    def submit(frame, **kw):  # type: ignore[no-untyped-def]
        submitted.append(1)
        return real_submit(frame, **kw)

    def collect(pending):  # type: ignore[no-untyped-def]
        collected_after.append(len(submitted))
        return real_collect(pending)

    monkeypatch.setattr(runtime, "submit", submit)
    monkeypatch.setattr(runtime, "collect", collect)
    summary = run_camera_loop(runtime, FrameReader(open_source(sample_video)))
    assert summary.frames == 12 and collected_after == list(range(1, 13))


def test_max_frames(runtime: DefenseRuntime, sample_video: Path, tmp_path: Path) -> None:
    summary = run_camera_loop(
        runtime, FrameReader(open_source(sample_video)), log=VerdictLog(tmp_path / "v.jsonl"),
        options=RunOptions(max_frames=5)
    )
    assert summary.stopped == "max-frames" and summary.frames == 5
    assert len(read_log(tmp_path / "v.jsonl")) == 5


def test_bad_frames_are_counted_and_logged_as_skips(runtime: DefenseRuntime, tmp_path: Path) -> None:
    good = np.full((40, 60, 3), 90, np.uint8)
    nan = np.full((40, 60, 3), np.nan, np.float32)
    source = ScriptedSource([good, nan, np.zeros((40, 60, 5), np.uint8), good], live=False)
    summary = run_camera_loop(runtime, FrameReader(source), log=VerdictLog(tmp_path / "v.jsonl"))
    records = read_log(tmp_path / "v.jsonl")
    assert summary.frames == 2 and summary.skipped == 2 and summary.failure is None
    assert [r["frame"] for r in records] == [0, 1, 2, 3]
    assert [r.get("skipped", False) for r in records] == [False, True, True, False]
    assert "NaN" in records[1]["error"] and "shape" in records[2]["error"]
    assert "label" in records[0] and "label" in records[3]


def test_an_image_folder_log_names_every_file_and_every_skipped_one(runtime: DefenseRuntime, image_folder: Path,
                                                                    tmp_path: Path) -> None:
    (image_folder / "broken.png").write_bytes(b"not a png")  # sorts first
    (image_folder / "zz_empty.jpg").write_bytes(b"")  # sorts last
    summary = run_camera_loop(runtime, FrameReader(open_source(image_folder)), log=VerdictLog(tmp_path / "v.jsonl"))
    records = read_log(tmp_path / "v.jsonl")
    names = sorted(p.name for p in image_folder.iterdir())
    assert [r["file"] for r in records] == names and [r["frame"] for r in records] == list(range(6))
    assert [r.get("skipped", False) for r in records] == [True, False, False, False, False, True]
    assert "broken.png" in records[0]["error"] and "label" in records[1] and "label" not in records[0]
    assert summary.frames == 4 and summary.skipped == 2 and summary.failure is None


def test_running_out_of_memory_mid_run_is_a_clear_failure(runtime: DefenseRuntime, sample_video: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A MemoryError (huge frames, many tiles) ends the run like any failure: one line, outputs closed, summary
    complete."""
    submit, calls = runtime.submit, []

    def failing_submit(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 4:
            raise MemoryError
        return submit(*args, **kwargs)

    monkeypatch.setattr(runtime, "submit", failing_submit)
    summary = run_camera_loop(runtime, FrameReader(open_source(sample_video)), log=VerdictLog(tmp_path / "v.jsonl"))
    assert summary.stopped == "error" and "out of memory after 3 frames" in (summary.error or "")
    assert "--batch-size" not in (summary.error or "") and summary.frames == len(read_log(tmp_path / "v.jsonl")) == 3


def test_a_stall_ends_the_run_with_the_error_after_writing_everything(runtime: DefenseRuntime, tmp_path: Path) -> None:
    frames = [np.full((40, 60, 3), i * 20, np.uint8) for i in range(3)]
    source = ScriptedSource([*frames, "block"], live=True)
    video = tmp_path / "out.avi"
    try:
        summary = run_camera_loop(
            runtime, FrameReader(source, ReaderOptions(stall_timeout=0.3)), log=VerdictLog(tmp_path / "v.jsonl"),
            sinks=[VideoFileOutput(video, fps=5)],
        )  # fmt: skip
    finally:
        source.release.set()
    assert isinstance(summary.failure, SourceError) and summary.stopped == "error"
    assert "stalled" in (summary.error or "")
    # a live source: frames read faster than judged may be dropped, and are counted
    assert summary.frames + summary.dropped == 3 and summary.frames >= 1
    assert len(read_log(tmp_path / "v.jsonl")) == summary.frames == count_video_frames(video)


def test_ctrl_c_stops_gracefully_and_keeps_the_log(runtime: DefenseRuntime, tmp_path: Path) -> None:
    """SIGINT during a run: the frame in flight is finished, the log is intact, the handler restored."""
    frames = [np.full((40, 60, 3), i, np.uint8) for i in range(200)]

    class Interrupting(ScriptedSource):
        def read(self) -> np.ndarray | None:
            if len(self.reads) == 190:
                os.kill(os.getpid(), signal.SIGINT)
            return super().read()

    previous = signal.getsignal(signal.SIGINT)
    summary = run_camera_loop(runtime, FrameReader(Interrupting(frames, live=False)),
                              log=VerdictLog(tmp_path / "v.jsonl"))
    records = read_log(tmp_path / "v.jsonl")
    assert summary.stopped == "interrupted" and summary.failure is None
    assert 1 <= summary.frames == len(records) < 200
    assert [r["frame"] for r in records] == list(range(len(records)))
    assert signal.getsignal(signal.SIGINT) is previous


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_gracefully_like_ctrl_c(runtime: DefenseRuntime, tmp_path: Path, signum: int) -> None:
    """A service manager's SIGTERM (or a closed terminal's SIGHUP) finishes the run like Ctrl-C."""
    frames = [np.full((40, 60, 3), i, np.uint8) for i in range(200)]
    fallback: list[int] = []

    class Terminating(ScriptedSource):
        def read(self) -> np.ndarray | None:
            if len(self.reads) == 190:
                os.kill(os.getpid(), signum)
            return super().read()

    def record(n: int, frame: object) -> None:  # without the run's own handler: recorded instead of fatal
        fallback.append(n)

    previous = signal.signal(signum, record)
    try:
        summary = run_camera_loop(runtime, FrameReader(Terminating(frames, live=False)),
                                  log=VerdictLog(tmp_path / "v.jsonl"))
        assert not fallback and signal.getsignal(signum) is record  # the run handled it, then restored the handler
    finally:
        signal.signal(signum, previous)
    records = read_log(tmp_path / "v.jsonl")
    assert summary.stopped == "interrupted" and summary.signal == signal.Signals(signum).name
    assert 1 <= summary.frames == len(records) < 200 and summary.to_json()["signal"] == summary.signal


def test_a_second_ctrl_c_interrupts_at_once() -> None:
    stop = threading.Event()
    with pytest.raises(KeyboardInterrupt), graceful_interrupt(stop):
        signal.raise_signal(signal.SIGINT)
        assert stop.is_set()
        signal.raise_signal(signal.SIGINT)
    assert stop.is_set()


def test_stop_event_from_another_thread(runtime: DefenseRuntime, sample_video: Path) -> None:
    stop = threading.Event()
    stop.set()
    summary = run_camera_loop(runtime, FrameReader(open_source(sample_video)), stop=stop)
    assert summary.stopped == "interrupted" and summary.frames == 0
