"""`ism-edge run` with several inputs: shared batches, per-source outputs and summary, failing inputs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")  # only to build the engine directory fixture

from ism_edge.errors import SourceError  # noqa: E402
from ism_edge_cli.main import app  # noqa: E402
from ism_edge_cli.run import split_arguments  # noqa: E402
from tests.cli import one_error_line  # noqa: E402
from tests.ism_edge.conftest import (  # noqa: E402
    PHOTO_NAMES,
    PHOTOS,
    count_video_frames,
    shared_engine_dir,
    shared_sample_video,
)

runner = CliRunner()


@pytest.fixture(scope="session")
def engine_dir(untrained_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_engine_dir(untrained_bundle_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def sample_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_sample_video(tmp_path_factory)


def log_records(path: Path) -> list[dict]:
    """The verdict lines (not the run's header line)."""
    return [rec for rec in (json.loads(line) for line in path.read_text().splitlines()) if "frame" in rec]


def texts(uris: list) -> list[str]:
    return [u.text for u in uris]


def test_which_argument_is_the_output(tmp_path: Path) -> None:
    assert split_arguments(["a.mp4", "out.mp4"], [], None) == (split_arguments(["a.mp4"], [], None)[0], "out.mp4")
    uris, out = split_arguments(["a.mp4", "rtsp://cam/1"], [], None)  # a stream cannot be an output
    assert texts(uris) == ["a.mp4", "rtsp://cam/1"] and out is None
    uris, out = split_arguments(["a.mp4", "b.mp4", "c.mp4"], [], None)
    assert texts(uris) == ["a.mp4", "b.mp4", "c.mp4"] and out is None
    uris, out = split_arguments(["a.mp4", "b.mp4", "out_{source}.mp4"], [], None)
    assert texts(uris) == ["a.mp4", "b.mp4"] and out == "out_{source}.mp4"
    uris, out = split_arguments(["a.mp4", "b.mp4", "display://0"], [], None)
    assert len(uris) == 2 and out == "display://0"
    uris, out = split_arguments(["a.mp4", "b.mp4"], [], "none")  # two files, no annotated output
    assert texts(uris) == ["a.mp4", "b.mp4"] and out is None
    uris, out = split_arguments([], [0, 2], "o_{source}.mp4")
    assert texts(uris) == ["camera 0", "camera 2"] and out == "o_{source}.mp4"
    with pytest.raises(SourceError, match="not both"):
        split_arguments(["a.mp4"], [0], None)
    uris, out = split_arguments(["a.mp4", "b.mp4"], [], None, mosaic=True)  # a mosaic tiles several inputs
    assert texts(uris) == ["a.mp4", "b.mp4"] and out is None
    uris, out = split_arguments(["a.mp4", "b.mp4", "display://0"], [], None, mosaic=True)
    assert texts(uris) == ["a.mp4", "b.mp4"] and out == "display://0"


def test_two_inputs_are_judged_and_written_per_source(engine_dir: Path, sample_video: Path, tmp_path: Path) -> None:
    log, summary = tmp_path / "v.jsonl", tmp_path / "summary.json"
    r = runner.invoke(app, ["run", str(engine_dir), str(sample_video), str(PHOTOS), str(tmp_path / "out_{source}"),
                            "--log", str(log), "--summary-json", str(summary)])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    records = log_records(log)
    n_photos = len(list(PHOTOS.glob("*.jpg")))
    assert [r["frame"] for r in records if r["source"] == 0] == list(range(12))
    assert sorted(r["file"] for r in records if r["source"] == 1) == sorted(p.name for p in PHOTOS.glob("*.jpg"))
    assert len(list((tmp_path / "out_0").glob("*.jpg"))) == 12 and len(list((tmp_path / "out_1").glob("*.jpg"))) \
        == n_photos
    s = json.loads(summary.read_text())
    assert [x["frames"] for x in s["sources"]] == [12, n_photos] and s["total"]["frames"] == 12 + n_photos
    assert s["sources"][0]["source"] == str(sample_video) and s["total"]["stopped"] == "end"
    assert "total" in r.stderr and "batches" in r.stderr


def test_one_output_for_several_inputs_is_refused_before_anything_is_written(engine_dir: Path, sample_video: Path,
                                                                             tmp_path: Path) -> None:
    args = ["run", str(engine_dir), str(sample_video), str(sample_video), "--output", str(tmp_path / "out.mp4"),
            "--log", str(tmp_path / "v.jsonl")]
    assert "{source}" in one_error_line(runner.invoke(app, args))
    assert not (tmp_path / "v.jsonl").exists() and not (tmp_path / "out.mp4").exists()


def test_an_output_may_not_overwrite_any_input(engine_dir: Path, sample_video: Path, tmp_path: Path) -> None:
    clip = tmp_path / "clip_1.mp4"
    clip.write_bytes(sample_video.read_bytes())
    args = ["run", str(engine_dir), str(sample_video), str(clip), "--output", str(tmp_path / "clip_{source}.mp4")]
    assert "never overwrites its input" in one_error_line(runner.invoke(app, args))
    assert clip.read_bytes() == sample_video.read_bytes()


def test_an_input_that_cannot_be_opened_leaves_the_others_running(engine_dir: Path, sample_video: Path,
                                                                   tmp_path: Path) -> None:
    log = tmp_path / "v.jsonl"
    r = runner.invoke(app, ["run", str(engine_dir), str(tmp_path / "missing.mp4"), str(sample_video),
                            "--output", "none", "--log", str(log), "--headless"])  # fmt: skip
    line = one_error_line(r)
    assert "missing.mp4 does not exist" in line and "warning: input 0" in r.stderr
    assert [rec["source"] for rec in log_records(log)] == [1] * 12


def test_cameras_that_never_open_are_one_error_line(engine_dir: Path) -> None:
    r = runner.invoke(app, ["run", str(engine_dir), "--camera", "98", "--camera", "99", "--reconnect", "0",
                            "--headless"])  # fmt: skip
    assert "camera 98 could not be opened" in one_error_line(r)
    assert "camera 99 could not be opened" in r.stderr


def test_max_frames_counts_per_input(engine_dir: Path, sample_video: Path, tmp_path: Path) -> None:
    log = tmp_path / "v.jsonl"
    r = runner.invoke(app, ["run", str(engine_dir), str(sample_video), str(PHOTOS / f"{PHOTO_NAMES[0]}.jpg"),
                            "--output", "none", "--log", str(log), "--max-frames", "3"])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    records = log_records(log)
    assert len([x for x in records if x["source"] == 0]) == 3 and len([x for x in records if x["source"] == 1]) == 1
    assert count_video_frames(sample_video) == 12


def test_two_inputs_make_one_mosaic_video(engine_dir: Path, sample_video: Path, tmp_path: Path) -> None:
    wall, log, summary = tmp_path / "wall.mp4", tmp_path / "v.jsonl", tmp_path / "summary.json"
    r = runner.invoke(app, ["run", str(engine_dir), str(sample_video), str(PHOTOS), "--mosaic", str(wall),
                            "--mosaic-cell", "320x240", "--log", str(log), "--summary-json", str(summary)])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    s = json.loads(summary.read_text())
    n_photos = len(list(PHOTOS.glob("*.jpg")))
    assert s["total"]["frames"] == 12 + n_photos and count_video_frames(wall) == s["batches"] < 12 + n_photos
    assert {"output": "mosaic", "path": str(wall), "frames": s["batches"], "complete": True} in s["total"]["outputs"]
    cap = cv2.VideoCapture(str(wall))
    assert (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (640, 240)  # 1 × 2 cells
    cap.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json", "v.jsonl", "wall.mp4"]  # no OUTPUT per input
    header = json.loads(log.read_text().splitlines()[0])
    assert header["mosaic"] == str(wall) and header["output"] == [None, None]
    assert "mosaic: 1x2 cells of 320x240" in r.stderr and f"{s['batches']} frames in {wall}" in r.stderr


def test_a_mosaic_and_outputs_per_input_together(engine_dir: Path, sample_video: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["run", str(engine_dir), str(sample_video), str(sample_video),
                            str(tmp_path / "out_{source}.avi"), "--mosaic", str(tmp_path / "wall"),
                            "--mosaic-grid", "2x1", "--mosaic-cell", "160x120", "--log", str(tmp_path / "v.jsonl")])
    assert r.exit_code == 0, r.stderr
    assert [count_video_frames(tmp_path / f"out_{i}.avi") for i in (0, 1)] == [12, 12]
    walls = sorted((tmp_path / "wall").glob("*.jpg"))
    assert 12 <= len(walls) < 24 and cv2.imread(str(walls[0])).shape == (240, 160, 3)  # 2 × 1 cells


def test_the_mosaic_may_not_overwrite_an_input_or_another_output(engine_dir: Path, sample_video: Path,
                                                                tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(sample_video.read_bytes())
    log = tmp_path / "v.jsonl"
    line = one_error_line(runner.invoke(app, ["run", str(engine_dir), str(sample_video), str(clip),
                                              "--mosaic", str(clip), "--log", str(log)]))
    assert "--mosaic" in line and "never overwrites its input" in line
    assert clip.read_bytes() == sample_video.read_bytes() and not log.exists()
    line = one_error_line(runner.invoke(app, ["run", str(engine_dir), str(sample_video), str(clip),
                                              "--output", str(tmp_path / "o_{source}.mp4"),
                                              "--mosaic", str(tmp_path / "o_1.mp4")]))
    assert "--mosaic" in line and "are the same file" in line
