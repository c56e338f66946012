"""`ism-edge calibrate` from the command line: thresholds from clean frames, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")  # only to build the engine directory fixture

from ism_edge_cli.main import app  # noqa: E402
from tests.cli import one_error_line  # noqa: E402
from tests.ism_edge.conftest import PHOTO_NAMES, PHOTOS, shared_engine_dir, video_frames  # noqa: E402

runner = CliRunner()


@pytest.fixture
def engines(untrained_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    dst = tmp_path / "engines"
    shutil.copytree(shared_engine_dir(untrained_bundle_dir, tmp_path_factory), dst)
    return dst


@pytest.fixture
def clean_frames(tmp_path: Path) -> Path:
    """20 clean 160×120 frames as PNG files (a moving camera over the sample photos)."""
    photos = [cv2.imread(str(PHOTOS / f"{name}.jpg"), cv2.IMREAD_COLOR) for name in PHOTO_NAMES]
    folder = tmp_path / "clean"
    folder.mkdir()
    for i, frame in enumerate(video_frames(photos, 20)):
        cv2.imwrite(str(folder / f"{i:03d}.png"), frame)
    return folder


def test_calibrated_thresholds_hold_the_rate_on_the_frames(engines: Path, clean_frames: Path, tmp_path: Path) -> None:
    record = tmp_path / "calibration.json"
    result = runner.invoke(app, ["calibrate", str(engines), str(clean_frames), "--fpr", "0.25", "--json", str(record)])
    assert result.exit_code == 0, result.output
    assert "20 clean frames" in result.stdout and "new" in result.stdout and "p_score" in result.stdout
    manifest = json.loads((engines / "manifest.json").read_text())
    assert manifest["thresholds"] == json.loads(record.read_text())["thresholds"]
    assert manifest["calibration"]["frames"] == 20 and manifest["target_fpr"] == 0.25

    log = tmp_path / "verdicts.jsonl"
    run = runner.invoke(app, ["run", str(engines), str(clean_frames), "--headless", "--feedback-rounds", "0",
                              "--log", str(log)])
    assert run.exit_code == 0, run.output
    assert "calibrated in" not in run.stderr  # same mode: no warning
    assert f"thresholds: calibrated on 20 clean frames of {clean_frames}" in run.stderr
    verdicts = [v for v in map(json.loads, log.read_text().splitlines()) if "frame" in v]  # not the header
    assert len(verdicts) == 20
    for k, threshold in manifest["thresholds"].items():  # each detector flags at most 25 % of them
        assert sum(v["scores"][k] > threshold for v in verdicts) <= 5

    tile = runner.invoke(app, ["run", str(engines), str(clean_frames), "--headless", "--mode", "tile",
                               "--max-frames", "1", "--log", str(tmp_path / "tile.jsonl")])
    assert tile.exit_code == 0 and "warning: the thresholds were calibrated in resize mode" in tile.stderr


def test_dry_run_changes_nothing(engines: Path, clean_frames: Path) -> None:
    before = (engines / "manifest.json").read_bytes()
    result = runner.invoke(app, ["calibrate", str(engines), str(clean_frames), "--fpr", "0.25", "--mode", "tile",
                                 "--tile-grid", "2x2", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "dry run" in result.stdout and "tile mode, grid 2x2" in result.stdout
    assert (engines / "manifest.json").read_bytes() == before


@pytest.mark.parametrize(("args", "expected"), [
    (["--fpr", "0.1"], "20 frames are too few to calibrate a 10.00% false-positive rate (needs at least 50"),
    (["--fpr", "0.25", "--max-frames", "10"], "--max-frames 10 is below the 20 frames"),
    (["--fpr", "0.25", "--camera", "0"], "give exactly one input"),
])
def test_refusals_leave_the_manifest_alone(engines: Path, clean_frames: Path, args: list[str], expected: str) -> None:
    before = (engines / "manifest.json").read_bytes()
    result = runner.invoke(app, ["calibrate", str(engines), str(clean_frames), *args])
    assert result.exit_code != 0
    assert expected in (one_error_line(result) if "error:" in result.stderr else result.output)
    assert (engines / "manifest.json").read_bytes() == before


def test_bad_inputs_give_one_error_line(engines: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00not a video" * 50)
    cases = [
        (["calibrate", str(tmp_path / "nowhere"), str(broken)], "does not exist"),
        (["calibrate", str(engines), str(broken)], "could not be opened"),
        (["calibrate", str(engines), str(tmp_path / "missing-folder")], "does not exist"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert expected in one_error_line(result), args


def test_an_unwritable_engine_directory_is_one_error_line(engines: Path, clean_frames: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import ism_edge.manifest

    def refuse(path, obj) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    before = (engines / "manifest.json").read_bytes()
    monkeypatch.setattr(ism_edge.manifest, "atomic_write_json", refuse)
    result = runner.invoke(app, ["calibrate", str(engines), str(clean_frames), "--fpr", "0.25"])
    line = one_error_line(result)
    assert "cannot rewrite" in line and "Permission denied" in line and "nothing was changed" in line
    assert (engines / "manifest.json").read_bytes() == before
