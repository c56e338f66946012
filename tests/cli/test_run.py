"""`ism-edge run` from the command line on short generated videos and image folders."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ism_edge.errors import ExitCode

pytest.importorskip("torch")  # only to build the engine directory fixture

from ism_edge.outputs import opencv_has_gui  # noqa: E402
from ism_edge_cli.main import app  # noqa: E402
from tests.cli import one_error_line  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.ism_edge.conftest import (  # noqa: E402
    PHOTO_NAMES,
    PHOTOS,
    count_video_frames,
    edit_manifest,
    shared_engine_dir,
    shared_sample_video,
    video_frames,
    write_video,
)
from tests.ism_edge.streams import MjpegServer  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="session")
def engine_dir(untrained_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The engine directory that tests/ism_edge uses (built once per session)."""
    return shared_engine_dir(untrained_bundle_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def sample_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-frame 160×120 mp4 made from the sample photos."""
    return shared_sample_video(tmp_path_factory)


def log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def log_records(path: Path) -> list[dict]:
    """The verdict lines (not the runs' header lines)."""
    return [rec for rec in log_lines(path) if "frame" in rec]


def test_run_on_a_video_logs_every_frame_and_writes_the_annotated_video(engine_dir: Path, sample_video: Path,
                                                                        tmp_path: Path) -> None:
    log, out, summary = tmp_path / "verdicts.jsonl", tmp_path / "annotated.mp4", tmp_path / "summary.json"
    r = runner.invoke(app, ["run", str(engine_dir), f"file://{sample_video}", f"file://{out}", "--log", str(log),
                            "--summary-json", str(summary)])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    records = log_records(log)
    assert len(records) == 12 == count_video_frames(sample_video) == count_video_frames(out)
    assert [rec["frame"] for rec in records] == list(range(12))
    for rec in records:
        assert {"label", "confidence", "flagged", "scores", "timings_ms", "latency_ms"} <= set(rec)
    s = json.loads(summary.read_text())
    assert s["frames"] == 12 and s["flagged"] == sum(rec["flagged"] for rec in records)
    assert s["dropped"] == 0 and s["stopped"] == "end" and s["latency_p99_ms"] >= s["latency_p50_ms"] > 0
    assert "frames   12" in r.stderr and "p50" in r.stderr and "fps" in r.stderr


def test_the_log_defaults_to_stdout_and_max_frames(engine_dir: Path, sample_video: Path) -> None:
    r = runner.invoke(app, ["run", str(engine_dir), str(sample_video), "--headless", "--max-frames", "4"])
    assert r.exit_code == 0, r.stderr
    header, *lines = r.stdout.strip().splitlines()
    assert json.loads(header)["event"] == "start"
    assert len(lines) == 4 and all(json.loads(line)["frame"] == i for i, line in enumerate(lines))


def test_the_log_is_appended_across_runs(engine_dir: Path, sample_video: Path, tmp_path: Path) -> None:
    log = tmp_path / "v.jsonl"
    for _ in range(2):
        r = runner.invoke(app, ["run", str(engine_dir), str(sample_video), "--headless", "--max-frames", "3",
                                "--log", str(log)])
        assert r.exit_code == 0, r.stderr
    assert [rec["frame"] for rec in log_records(log)] == [0, 1, 2, 0, 1, 2]


def test_each_run_in_a_shared_log_starts_with_a_header_and_tags_every_line(engine_dir: Path, sample_video: Path,
                                                                          tmp_path: Path) -> None:
    from ism_edge import __version__

    log, summary = tmp_path / "v.jsonl", tmp_path / "summary.json"
    for _ in range(2):
        r = runner.invoke(app, ["run", str(engine_dir), str(sample_video), "--headless", "--max-frames", "3",
                                "--log", str(log), "--summary-json", str(summary)])
        assert r.exit_code == 0, r.stderr
    lines = log_lines(log)
    assert [rec.get("event") for rec in lines] == ["start", None, None, None] * 2
    first, second = lines[0], lines[4]
    assert first["run"] != second["run"] and first["run"] <= second["run"]  # ids sort by start time
    for header, run_lines in ((first, lines[:4]), (second, lines[4:])):
        assert {rec["run"] for rec in run_lines} == {header["run"]}
        assert header["ism_edge"] == __version__ and header["engine_dir"] == str(engine_dir.resolve())
        assert header["source"] == str(sample_video) and "frame" not in header
        assert datetime.fromisoformat(header["started"]).tzinfo is not None
        assert header["thresholds"] == json.loads((engine_dir / "manifest.json").read_text())["thresholds"]
    assert json.loads(summary.read_text())["run"] == second["run"]
    assert f"run {second['run']}" in r.stderr


def test_the_demo_report_reads_the_last_run_of_a_shared_log(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from demo_report import last_run
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    old = [{"frame": 0, "flagged": True}]  # a log written before run ids
    runs = [{"run": "a", "event": "start"}, {"run": "a", "frame": 0}, {"run": "b", "event": "start"},
            {"run": "b", "frame": 0}, {"run": "b", "frame": 1}]
    assert last_run(old) == old
    assert last_run(old + runs) == runs[3:]


def test_an_image_folder_in_tile_mode_to_an_image_folder(engine_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in PHOTO_NAMES[:2]:
        shutil.copy(PHOTOS / f"{name}.jpg", folder)
    out, log = tmp_path / "out", tmp_path / "v.jsonl"
    r = runner.invoke(app, ["run", str(engine_dir), str(folder), f"{out}/", "--mode", "tile", "--tile-grid", "2x3",
                            "--log", str(log), "--purified", str(tmp_path / "purified")])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    records = log_records(log)
    assert len(records) == 2 and all(rec["tiles"]["rows"] * rec["tiles"]["cols"] == 6 for rec in records)
    assert len(list(out.glob("*.jpg"))) == 2 and len(list((tmp_path / "purified").glob("*.jpg"))) == 2


def test_missing_engine_directory(tmp_path: Path, sample_video: Path) -> None:
    line = one_error_line(runner.invoke(app, ["run", str(tmp_path / "nope"), str(sample_video), "--headless"]))
    assert "does not exist" in line and "ism-edge build" in line


def test_corrupt_engine_directory_writes_no_log(engine_dir: Path, sample_video: Path, tmp_path: Path) -> None:
    broken = tmp_path / "engines"
    shutil.copytree(engine_dir, broken)
    (broken / "manifest.json").write_text("{not json")
    log = tmp_path / "v.jsonl"
    line = one_error_line(runner.invoke(app, ["run", str(broken), str(sample_video), "--headless", "--log", str(log)]))
    assert "manifest.json" in line and not log.exists()


def test_mismatched_engines_and_rebuild_on_mismatch(engine_dir: Path, sample_video: Path, tmp_path: Path) -> None:
    copy = tmp_path / "engines"
    shutil.copytree(engine_dir, copy)
    versions = json.loads((copy / "manifest.json").read_text())["versions"]
    edit_manifest(copy, versions={**versions, "onnxruntime": "0.9.0"})
    args = ["run", str(copy), str(sample_video), "--headless", "--max-frames", "2", "--log", str(tmp_path / "v.jsonl")]
    assert "0.9.0" in one_error_line(runner.invoke(app, args))
    r = runner.invoke(app, [*args, "--rebuild-on-mismatch"])
    assert r.exit_code == 0, r.stderr
    assert "rebuilding" in r.stderr and len(log_records(tmp_path / "v.jsonl")) == 2


def test_a_camera_that_cannot_be_opened(engine_dir: Path) -> None:
    line = one_error_line(runner.invoke(app, ["run", str(engine_dir), "--camera", "99", "--headless"]))
    assert "camera 99 could not be opened" in line


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["nothing.mp4"], "does not exist"),
        (["ftp://host/video"], "unsupported scheme"),
        ([], "give exactly one input"),
        (["clip.mp4", "--camera", "0"], "give exactly one input"),
    ],
)
def test_bad_inputs(engine_dir: Path, args: list[str], words: str) -> None:
    assert words in one_error_line(runner.invoke(app, ["run", str(engine_dir), *args, "--headless"]))


def test_corrupt_video(engine_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00garbage" * 500)
    assert "could not be opened" in one_error_line(runner.invoke(app, ["run", str(engine_dir), str(bad), "--headless"]))


def test_unsupported_output(engine_dir: Path, sample_video: Path, tmp_path: Path) -> None:
    line = one_error_line(runner.invoke(app, ["run", str(engine_dir), str(sample_video), str(tmp_path / "out.gif")]))
    assert "out.gif" in line


@pytest.mark.skipif(opencv_has_gui(), reason="this OpenCV has a GUI")
def test_display_output_without_a_gui_and_headless(engine_dir: Path, sample_video: Path) -> None:
    line = one_error_line(runner.invoke(app, ["run", str(engine_dir), str(sample_video), "display://0"]))
    assert "--headless" in line
    r = runner.invoke(app, ["run", str(engine_dir), str(sample_video), "display://0", "--headless",
                            "--max-frames", "1"])
    assert r.exit_code == 0, r.stderr


def test_realtime_plays_a_video_at_its_frame_rate(engine_dir: Path, sample_video: Path, tmp_path: Path) -> None:
    """--realtime releases frame i at i/fps (so the run lasts at least 11 frame periods) and counts
    the frames it had to drop, as a live camera would; every frame is either judged or dropped."""
    import time

    import cv2

    cap = cv2.VideoCapture(str(sample_video))
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    summary = tmp_path / "s.json"
    t0 = time.perf_counter()
    r = runner.invoke(app, ["run", str(engine_dir), str(sample_video), "--headless", "--realtime",
                            "--log", str(tmp_path / "v.jsonl"), "--summary-json", str(summary)])  # fmt: skip
    elapsed = time.perf_counter() - t0
    assert r.exit_code == 0, r.stderr
    s = json.loads(summary.read_text())
    assert s["frames"] + s["dropped"] == 12 and s["frames"] >= 1 and s["stopped"] == "end"
    assert elapsed >= 11 / fps


def test_realtime_refuses_a_folder(engine_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(PHOTOS / f"{PHOTO_NAMES[0]}.jpg", folder)
    line = one_error_line(runner.invoke(app, ["run", str(engine_dir), str(folder), "--headless", "--realtime"]))
    assert "--realtime paces a video file" in line


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and mode (to prove a refused run touched nothing)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("output", "extra", "words"),
    [
        ("{video}", [], "is the input"),
        ("{tmp}/out.mp4", ["--log", "{video}"], "--log"),
        ("{tmp}/out.mp4", ["--summary-json", "{video}"], "--summary-json"),
        ("{tmp}/link.mp4", [], "is the input"),  # a symbolic link to the input
        ("{tmp}/hard.mp4", [], "is the input"),  # a hard link to the input
        ("{tmp}/out.mp4", ["--log", "{tmp}/out.mp4"], "the same file"),
        ("{tmp}/out.mp4", ["--log", "{tmp}/v.jsonl", "--summary-json", "{tmp}/v.jsonl"], "the same file"),
        ("{tmp}/out.mp4", ["--summary-json", "{engines}/manifest.json"], "engine directory"),
        ("{engines}/", [], "engine directory"),
        ("{tmp}/out.mp4", ["--purified", "{engines}/x"], "engine directory"),
    ],
)
def test_no_output_may_overwrite_the_input_another_output_or_the_engines(
    engine_dir: Path, sample_video: Path, tmp_path: Path, output: str, extra: list[str], words: str
) -> None:
    """Refused before anything is loaded or written: one error line, every file left as it was."""
    engines, work = tmp_path / "engines", tmp_path / "work"
    shutil.copytree(engine_dir, engines)
    work.mkdir()
    video = work / "clip.mp4"
    shutil.copy(sample_video, video)
    (work / "link.mp4").symlink_to(video)
    (work / "hard.mp4").hardlink_to(video)
    before = _snapshot(tmp_path)
    names = {"video": video, "tmp": work, "engines": engines}
    args = ["run", str(engines), str(video), output.format(**names), *(e.format(**names) for e in extra), "--headless"]
    line = one_error_line(runner.invoke(app, args))
    assert words in line
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in work.iterdir()) == ["clip.mp4", "hard.mp4", "link.mp4"]


def test_an_output_folder_may_not_be_the_input_folder(engine_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in PHOTO_NAMES[:2]:
        shutil.copy(PHOTOS / f"{name}.jpg", folder)
    before = _snapshot(folder)
    for args in ([f"{folder}/"], ["--purified", str(folder)],
                 [f"{tmp_path}/out/", "--log", str(folder / f"{PHOTO_NAMES[0]}.jpg")]):
        line = one_error_line(runner.invoke(app, ["run", str(engine_dir), str(folder), *args, "--headless"]))
        assert str(folder) in line
        assert _snapshot(folder) == before and not (tmp_path / "out").exists()


def run_in_subprocess(args: list[str], *, file_size_limit: int | None = None) -> subprocess.Popen[str]:
    """``ism-edge ARGS`` in a fresh interpreter (for signals and resource limits), optionally with
    RLIMIT_FSIZE: a write past the limit fails with EFBIG, as on a full disk (SIGXFSZ ignored)."""
    setup = "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN)"
    if file_size_limit is not None:
        setup += f"; resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size_limit}, {file_size_limit}))"
    code = f"{setup}; sys.argv = ['ism-edge', *sys.argv[1:]]; from ism_edge_cli.main import main; main()"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def finished(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def only_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in stderr, stderr
    return errors[0]


def test_a_video_the_disk_cannot_hold_is_an_error_not_a_success(engine_dir: Path, sample_video: Path,
                                                                tmp_path: Path) -> None:
    """With a 20 kB file-size limit the annotated mp4 (~80 kB) cannot be finished: the run must not
    say it ended well, must not leave an unplayable video, and the summary says 0 frames reached it."""
    out, summary = tmp_path / "out.mp4", tmp_path / "summary.json"
    code, stdout, stderr = finished(run_in_subprocess(
        ["run", str(engine_dir), str(sample_video), str(out), "--summary-json", str(summary)], file_size_limit=20_000))
    assert code != 0 and str(out) in only_error_line(stderr)
    assert len(stdout.splitlines()) == 1 + 12  # the log (stdout: header, 12 verdicts) was not limited
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    s = json.loads(summary.read_text())
    assert s["stopped"] == "error" and str(out) in s["error"]
    assert {"output": "video", "path": str(out), "frames": 0, "complete": False} in s["outputs"]


def test_a_log_the_disk_cannot_hold_keeps_whole_lines(engine_dir: Path, sample_video: Path, tmp_path: Path) -> None:
    """With a 3 kB limit the log fills after a few lines: the run stops with an error, the log holds
    only whole lines (the cut one rolled back), and the summary counts exactly what is in it."""
    log, summary = tmp_path / "v.jsonl", tmp_path / "summary.json"
    code, _, stderr = finished(run_in_subprocess(
        ["run", str(engine_dir), str(sample_video), "--headless", "--log", str(log), "--summary-json", str(summary)],
        file_size_limit=3_000))
    assert code != 0 and str(log) in only_error_line(stderr)
    text = log.read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()][1:]  # after the header
    assert 1 <= len(records) < 12 and [r["frame"] for r in records] == list(range(len(records)))
    s = json.loads(summary.read_text())
    assert s["frames"] == len(records) and s["stopped"] == "error"
    assert s["outputs"] == [{"output": "log", "path": str(log), "frames": len(records), "complete": False}]


def test_sigterm_finishes_the_video_and_the_summary(engine_dir: Path, tmp_path: Path) -> None:
    """SIGTERM (docker stop, systemd) mid-run: the video is finalised and playable, the summary is
    written, the log and the video hold the same frames, and the exit code is 128 + 15."""
    import cv2

    photos = [cv2.imread(str(PHOTOS / f"{name}.jpg"), cv2.IMREAD_COLOR) for name in PHOTO_NAMES]
    clip = write_video(tmp_path / "long.mp4", video_frames(photos, 200), fps=10.0)  # 20 s at --realtime
    out, log, summary = tmp_path / "out.mp4", tmp_path / "v.jsonl", tmp_path / "summary.json"
    proc = run_in_subprocess(["run", str(engine_dir), str(clip), str(out), "--realtime", "--log", str(log),
                              "--summary-json", str(summary)])  # fmt: skip
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and (not log.exists() or log.read_text().count("\n") < 3):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]
    os.kill(proc.pid, signal.SIGTERM)
    code, _, stderr = finished(proc, timeout=120)
    assert code == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    s = json.loads(summary.read_text())
    assert s["stopped"] == "interrupted" and s["signal"] == "SIGTERM"
    assert 3 <= s["frames"] == len(log_records(log)) == count_video_frames(out) < 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4", "out.mp4", "summary.json", "v.jsonl"]


def test_too_many_threads_are_refused_before_anything_runs(engine_dir: Path, sample_video: Path,
                                                           tmp_path: Path) -> None:
    log = tmp_path / "v.jsonl"
    r = runner.invoke(app, ["run", str(engine_dir), str(sample_video), "--headless", "--threads", "5000",
                            "--log", str(log)])
    assert r.exit_code == ExitCode.USAGE and "threads must be between 1 and" in r.stderr and "Traceback" not in r.stderr
    assert not log.exists()


def test_a_stalled_stream_is_reconnected_and_the_run_goes_on(engine_dir: Path, tmp_path: Path) -> None:
    """A loopback HTTP camera sends 5 frames per connection, then stalls with its socket open:
    after --stall-timeout the run reconnects (as the docs say) instead of ending with an error."""
    log, summary = tmp_path / "v.jsonl", tmp_path / "summary.json"
    with MjpegServer(frames=5) as server:
        r = runner.invoke(app, ["run", str(engine_dir), server.url, "--headless", "--stall-timeout", "1",
                                "--queue-size", "64", "--max-frames", "8", "--log", str(log),
                                "--summary-json", str(summary)])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    s = json.loads(summary.read_text())
    assert s["frames"] == 8 == len(log_records(log)) and s["reconnects"] == 1 and s["stopped"] == "max-frames"
    assert server.connections == 2


def test_engines_too_big_for_memory_name_the_real_option_and_create_nothing(engine_dir: Path, sample_video: Path,
                                                                            tmp_path: Path) -> None:
    """A manifest whose batch profile no machine can allocate ('--batch 1,8,1000000000000') is refused
    when it is read: the error names the field and 'ism-edge build' (run has no --batch-size) and no
    output exists yet."""
    engines = tmp_path / "engines"
    shutil.copytree(engine_dir, engines)
    edit_manifest(engines, batch={"min": 1, "opt": 8, "max": 10**12})
    log, out, purified = tmp_path / "v.jsonl", tmp_path / "out.mp4", tmp_path / "purified"
    line = one_error_line(runner.invoke(app, ["run", str(engines), str(sample_video), str(out), "--log", str(log),
                                              "--purified", str(purified)]))  # fmt: skip
    assert "--batch-size" not in line and "ism-edge build" in line and "batch.max" in line and str(engines) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]


@pytest.mark.parametrize(("threshold", "fail_on_flag", "code"), [
    (0.0, True, ExitCode.FLAGGED),  # every frame flagged
    (0.0, False, ExitCode.OK),
    (1e6, True, ExitCode.OK),  # no frame flagged
])
def test_fail_on_flag_exits_4_after_writing_every_output(engine_dir: Path, sample_video: Path, tmp_path: Path,
                                                         threshold: float, fail_on_flag: bool, code: int) -> None:
    copy = tmp_path / "engines"
    shutil.copytree(engine_dir, copy)
    edit_manifest(copy, thresholds={"recon_error": threshold, "jsd": threshold, "p_score": threshold})
    log, out, summary = tmp_path / "v.jsonl", tmp_path / "annotated.mp4", tmp_path / "summary.json"
    r = runner.invoke(app, ["run", str(copy), str(sample_video), str(out), "--log", str(log), "--max-frames", "5",
                            "--summary-json", str(summary), *(["--fail-on-flag"] if fail_on_flag else [])])
    assert r.exit_code == code, r.stderr
    flagged = sum(rec["flagged"] for rec in log_records(log))
    assert flagged == (5 if threshold == 0.0 else 0)
    assert json.loads(summary.read_text())["flagged"] == flagged and count_video_frames(out) == 5
    assert "error:" not in r.stderr and "Traceback" not in r.stderr
    if code == ExitCode.FLAGGED:
        assert r.stderr.strip().splitlines()[-1] == "flagged: 5 of 5 frames (--fail-on-flag)"


def test_an_mp4_without_an_h264_encoder_is_mpeg4_with_one_note(engine_dir: Path, sample_video: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from ism_edge import encoders

    monkeypatch.setattr(encoders, "h264_candidates", lambda: [])  # as with OpenCV's pip wheel alone
    encoders._first_working_h264.cache_clear()
    try:
        r = runner.invoke(app, ["run", str(engine_dir), str(sample_video), str(tmp_path / "out.mp4"),
                                "--log", str(tmp_path / "v.jsonl"), "--max-frames", "2"])
    finally:
        encoders._first_working_h264.cache_clear()
    assert r.exit_code == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "MPEG-4 Part 2" in notes[0] and "ism-edge[video]" in notes[0], r.stderr
    assert "(MPEG-4 Part 2, OpenCV)" in r.stderr and count_video_frames(tmp_path / "out.mp4") == 2
