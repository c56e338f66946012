"""Several sources through one runtime: batching, per-source logs and summaries, sources that fail,
end, stall or never open while the others run, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from ism_edge import DefenseRuntime
from ism_edge.errors import SourceError
from ism_edge.multi_stream import MultiStream, SourceEvent, SourceOutputs, run_multi_stream
from ism_edge.outputs import VerdictLog, VideoFileOutput
from ism_edge.sources import PacedSource, ReaderOptions, make_source
from tests.ism_edge.conftest import ScriptedSource, count_video_frames, video_frames, write_video

FAST_RETRY = ReaderOptions(reconnect_attempts=2, reconnect_delay=0.05, reconnect_max_delay=0.05, stall_timeout=5.0)


@pytest.fixture(scope="module")
def runtime(engine_dir: Path) -> DefenseRuntime:
    with DefenseRuntime(engine_dir) as rt:
        yield rt


@pytest.fixture(scope="module")
def small_video(photos: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 frames of 96×64 at 5 fps: another size, rate and length than ``sample_video`` (12 of 160×120 at 10 fps)."""
    return write_video(tmp_path_factory.mktemp("videos") / "small.avi", video_frames(photos, 7, (96, 64)), fps=5.0)


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_files_of_other_sizes_and_rates_are_batched_and_logged_per_source(
    runtime: DefenseRuntime, sample_video: Path, small_video: Path, image_folder: Path, tmp_path: Path
) -> None:
    log = tmp_path / "v.jsonl"
    videos = [VideoFileOutput(tmp_path / f"out_{i}.mp4", fps=10) for i in range(3)]
    multi = MultiStream(runtime, [str(sample_video), str(small_video), str(image_folder)])
    summary = run_multi_stream(runtime, multi, log=VerdictLog(log), outputs=[SourceOutputs([v]) for v in videos])
    records = read_log(log)
    assert summary.failure is None and summary.stopped == "end"
    counts = (12, 7, 4)
    for i, n in enumerate(counts):
        mine = [r for r in records if r["source"] == i]
        assert [r["frame"] for r in mine] == list(range(n))  # every frame, in the source's own numbering
        assert {r["source_uri"] for r in mine} == {multi.uris[i]}
        assert summary.sources[i].frames == n == count_video_frames(tmp_path / f"out_{i}.mp4")
        assert summary.sources[i].stopped == "end" and summary.sources[i].dropped == 0
    assert {tuple(r["frame_size"]) for r in records if r["source"] < 2} == {(120, 160), (64, 96)}
    assert summary.total.frames == len(records) == sum(counts)
    assert summary.batches < sum(counts) and summary.mean_batch is not None and summary.mean_batch > 1
    assert [o["output"] for o in summary.total.to_json()["outputs"]].count("log") == 1
    data = json.loads(json.dumps(summary.to_json()))
    assert [s["frames"] for s in data["sources"]] == list(counts) and data["total"]["frames"] == sum(counts)


def test_live_sources_at_other_rates_and_one_that_ends_while_the_other_is_live(
    runtime: DefenseRuntime, sample_video: Path, small_video: Path
) -> None:
    """Two videos paced like cameras (40 fps for 0.3 s, 7 fps for 1 s): the first ends while the
    second is live; every frame of each is judged or counted as dropped."""
    fast = PacedSource(make_source(sample_video), 40.0)
    slow = PacedSource(make_source(small_video), 7.0)
    events: list[SourceEvent] = []
    summary = run_multi_stream(runtime, MultiStream(runtime, [fast, slow]), on_event=events.append)
    assert summary.failure is None and summary.stopped == "end"
    assert summary.sources[0].frames + summary.sources[0].dropped == 12
    assert summary.sources[1].frames + summary.sources[1].dropped == 7 and summary.sources[1].frames >= 5
    ended = [e.source for e in events if e.kind == "ended"]
    assert ended == [0, 1]  # the fast one first, the other still live then


def test_the_python_api_yields_source_frame_and_verdict(runtime: DefenseRuntime, sample_video: Path,
                                                        small_video: Path) -> None:
    seen = list(MultiStream(runtime, [sample_video, small_video]))
    assert sorted((s, f) for s, f, _ in seen) == sorted([(0, i) for i in range(12)] + [(1, i) for i in range(7)])
    assert all(v.label in runtime.class_names for _, _, v in seen)


def test_onnx_runtime_batches_are_answered_before_the_next_is_gathered(
    runtime: DefenseRuntime, sample_video: Path, small_video: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime computes at submit: holding a batch in flight while the next one is gathered
    and computed would only add that time to its latency (files always have a frame waiting)."""
    submitted: list[int] = []
    real = runtime.submit_batch

    def counting(frames, **kw):  # type: ignore[no-untyped-def]
        pending = real(frames, **kw)
        submitted.append(len(frames))
        assert runtime.ready(pending)
        return pending

    monkeypatch.setattr(runtime, "submit_batch", counting)
    answered_after: list[int] = []
    for _ in MultiStream(runtime, [sample_video, small_video]):
        answered_after.append(len(submitted))
    # Every verdict is yielded before the next batch is submitted: the k-th batch's frames come
    # while k batches have been submitted, never k + 1.
    done = 0
    for k, size in enumerate(submitted, start=1):
        assert answered_after[done:done + size] == [k] * size
        done += size
    assert done == 19


def test_max_frames_is_per_source(runtime: DefenseRuntime, sample_video: Path, small_video: Path) -> None:
    seen = list(MultiStream(runtime, [sample_video, small_video], max_frames=3))
    assert sorted((s, f) for s, f, _ in seen) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_a_camera_that_never_opens_is_retried_and_reported_while_the_others_run(
    runtime: DefenseRuntime, sample_video: Path, tmp_path: Path
) -> None:
    dead = ScriptedSource([], live=True, opens=[False] * 10)
    events: list[SourceEvent] = []
    multi = MultiStream(runtime, [dead, make_source(sample_video)], reader_options=FAST_RETRY)
    summary = run_multi_stream(runtime, multi, log=VerdictLog(tmp_path / "v.jsonl"), on_event=events.append)
    assert [e.kind for e in events if e.source == 0] == ["retrying", "failed"]
    assert dead.open_calls == 3  # the first try and two retries
    assert summary.sources[1].frames == 12 and summary.sources[1].stopped == "end"
    assert summary.sources[0].frames == 0 and summary.sources[0].stopped == "error"
    assert isinstance(summary.failure, SourceError) and "could not be opened in 3 attempts" in str(summary.failure)
    assert len(read_log(tmp_path / "v.jsonl")) == 12


def test_a_camera_that_opens_late_joins_the_run(runtime: DefenseRuntime, sample_video: Path) -> None:
    class LateCamera(ScriptedSource):
        finite = True  # its end ends it (a camera would be reconnected, and this run would never end)

    frames = [np.full((48, 64, 3), 10 * i, np.uint8) for i in range(3)]
    late = LateCamera(frames, live=True, opens=[False, True])
    late_events: list[str] = []
    multi = MultiStream(runtime, [late, make_source(sample_video)],
                        reader_options=ReaderOptions(reconnect_attempts=1, reconnect_delay=0.05, stall_timeout=5.0))
    summary = run_multi_stream(runtime, multi, on_event=lambda e: late_events.append(e.kind) if e.source == 0 else None)
    assert late_events[:2] == ["retrying", "opened"]
    assert summary.sources[0].frames >= 1 and summary.sources[1].frames == 12


def test_a_file_that_cannot_be_opened_fails_alone(runtime: DefenseRuntime, sample_video: Path, tmp_path: Path) -> None:
    multi = MultiStream(runtime, [str(tmp_path / "missing.mp4"), str(sample_video)])
    summary = run_multi_stream(runtime, multi)
    assert summary.sources[0].stopped == "error" and "does not exist" in (summary.sources[0].error or "")
    assert summary.sources[1].frames == 12 and isinstance(summary.failure, SourceError)


def test_a_stalled_source_holds_back_neither_the_batches_nor_the_run(runtime: DefenseRuntime, sample_video: Path,
                                                                     tmp_path: Path) -> None:
    stuck = ScriptedSource([np.full((48, 64, 3), 50, np.uint8), "block"], live=True)
    options = ReaderOptions(stall_timeout=0.4, reconnect_attempts=0)
    try:
        started = time.monotonic()
        multi = MultiStream(runtime, [stuck, make_source(sample_video)], reader_options=options, batch_timeout=0.02)
        summary = run_multi_stream(runtime, multi, log=VerdictLog(tmp_path / "v.jsonl"))
        elapsed = time.monotonic() - started
    finally:
        stuck.release.set()
    assert summary.sources[1].frames == 12 and summary.sources[1].stopped == "end"
    assert summary.sources[0].frames == 1 and "stalled" in (summary.sources[0].error or "")
    assert elapsed < 5.0
    assert len(read_log(tmp_path / "v.jsonl")) == 13


def test_a_rejected_frame_is_skipped_and_the_rest_of_its_batch_judged(runtime: DefenseRuntime,
                                                                       tmp_path: Path) -> None:
    good = [np.full((40, 40, 3), 90, np.uint8) for _ in range(3)]
    bad = ScriptedSource([np.full((40, 40, 3), np.nan, np.float32)], live=False)
    multi = MultiStream(runtime, [ScriptedSource(good, live=False), bad])
    summary = run_multi_stream(runtime, multi, log=VerdictLog(tmp_path / "v.jsonl"))
    records = read_log(tmp_path / "v.jsonl")
    assert summary.sources[0].frames == 3 and summary.sources[1].skipped == 1 and summary.failure is None
    assert [r["source"] for r in records if r.get("skipped")] == [1]


def test_ctrl_c_with_several_sources_keeps_every_computed_verdict(runtime: DefenseRuntime, tmp_path: Path) -> None:
    frames = [np.full((40, 60, 3), i % 250, np.uint8) for i in range(300)]

    class Interrupting(ScriptedSource):
        def read(self) -> np.ndarray | None:
            if len(self.reads) == 280:
                os.kill(os.getpid(), signal.SIGINT)
            return super().read()

    previous = signal.getsignal(signal.SIGINT)
    multi = MultiStream(runtime, [Interrupting(list(frames), live=False), ScriptedSource(list(frames), live=False)])
    summary = run_multi_stream(runtime, multi, log=VerdictLog(tmp_path / "v.jsonl"))
    records = read_log(tmp_path / "v.jsonl")
    assert summary.stopped == "interrupted" and summary.total.signal == "SIGINT" and summary.failure is None
    assert 1 <= summary.total.frames == len(records) < 600
    for i in (0, 1):
        mine = [r["frame"] for r in records if r["source"] == i]
        assert mine == list(range(len(mine))) and summary.sources[i].frames == len(mine)
    assert signal.getsignal(signal.SIGINT) is previous


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one source"):
        MultiStream(None, [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_timeout"):
        MultiStream(None, ["a.mp4"], batch_timeout=-1)  # type: ignore[arg-type]
