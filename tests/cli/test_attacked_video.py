"""End to end: a trained bundle → engines → a video with known attacked frames → `ism-edge run`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")

from ism_edge_cli.main import app  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def attacked_run(trained_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from ism_edge_engines.build import build_engines

    work = tmp_path_factory.mktemp("attacked-video")
    engines = build_engines(trained_bundle_dir, work / "engines", parity_samples=32)
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_attack_video.py"), "--bundle", str(trained_bundle_dir),
         "--photos", str(ROOT / "data" / "samples" / "photos"), "--out", str(work / "video"),
         "--frames", "30", "--block", "5", "--eps", "0.3", "--steps", "5"],
        check=True, capture_output=True, text=True,
    )
    truth = json.loads((work / "video" / "truth.json").read_text())
    video = work / "video" / truth["video"]
    log = work / "verdicts.jsonl"
    r = runner.invoke(app, ["run", str(engines), f"file://{video}", f"file://{work / 'annotated.avi'}",
                            "--headless", "--log", str(log)])
    assert r.exit_code == 0, r.output + r.stderr
    rows = [row for row in map(json.loads, log.read_text().splitlines()) if "frame" in row]  # not the header
    return {"truth": truth, "rows": rows, "annotated": work / "annotated.avi"}


def test_one_valid_line_per_frame(attacked_run: dict) -> None:
    rows = attacked_run["rows"]
    assert [r["frame"] for r in rows] == list(range(30))
    assert all({"label", "confidence", "flagged", "scores", "timings_ms"} <= set(r) for r in rows)


def test_attacked_frames_are_flagged_far_more_often_than_clean_ones(attacked_run: dict) -> None:
    attacked = {int(i) for i in attacked_run["truth"]["attacked"]}
    assert len(attacked) == 10
    rows = attacked_run["rows"]
    rate_att = sum(r["flagged"] for r in rows if r["frame"] in attacked) / len(attacked)
    rate_clean = sum(r["flagged"] for r in rows if r["frame"] not in attacked) / (len(rows) - len(attacked))
    assert rate_att >= rate_clean + 0.5, (rate_att, rate_clean)


def test_annotated_video_has_every_frame(attacked_run: dict) -> None:
    cap = cv2.VideoCapture(str(attacked_run["annotated"]))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 30
