"""Thresholds from a deployment's clean frames (ism_edge.calibration)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ism_edge.calibration import (
    MIN_EXCEEDANCES,
    apply_calibration,
    calibrate,
    frame_scores,
    min_frames,
)
from ism_edge.errors import DataError
from ism_edge.manifest import SCORE_NAMES, load_manifest
from ism_edge.runtime import DefenseRuntime
from tests.ism_edge.conftest import video_frames

PREVIOUS = {"recon_error": 0.5, "jsd": 0.5, "p_score": 0.5}


def _scores(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.random(n) for k in SCORE_NAMES}


def test_min_frames_expects_five_frames_above_each_threshold() -> None:
    assert (min_frames(0.01), min_frames(0.05), min_frames(0.25)) == (500, 100, 20)
    assert all(min_frames(f) * f >= MIN_EXCEEDANCES for f in (0.003, 0.01, 0.02, 0.1, 0.3))


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.2])
def test_thresholds_are_the_upper_quantile_and_hold_the_rate(fpr: float) -> None:
    scores = _scores(1000)
    cal = calibrate(scores, PREVIOUS, fpr, mode="resize", source="test")
    for k in SCORE_NAMES:
        assert cal.thresholds[k] == np.quantile(scores[k], 1 - fpr, method="higher")
        assert cal.thresholds[k] in scores[k]  # an observed score, not an interpolation
        assert cal.fpr_after[k] <= fpr and cal.fpr_after[k] >= fpr - 2 / len(scores[k])
        assert cal.fpr_before[k] == pytest.approx((scores[k] > 0.5).mean())
    assert max(cal.fpr_after.values()) <= cal.any_after <= sum(cal.fpr_after.values()) + 1e-12
    assert cal.frames == 1000 and cal.previous == PREVIOUS and cal.target_fpr == fpr
    assert json.loads(json.dumps(cal.to_json()))["thresholds"] == cal.thresholds


def test_too_few_frames_or_broken_scores_are_refused() -> None:
    with pytest.raises(DataError, match=r"99 frames are too few to calibrate a 5\.00% .*at least 100"):
        calibrate(_scores(99), PREVIOUS, 0.05, mode="resize")
    scores = _scores(200)
    scores["jsd"][3] = np.nan
    with pytest.raises(DataError, match="jsd score is not finite"):
        calibrate(scores, PREVIOUS, 0.05, mode="resize")
    with pytest.raises(ValueError, match="fpr"):
        calibrate(_scores(200), PREVIOUS, 0.5, mode="resize")


def test_frame_scores_are_the_runtimes_verdict_scores(engine_dir: Path, photos: list[np.ndarray]) -> None:
    frames = video_frames(photos, 11)
    counts: list[int] = []
    with DefenseRuntime(engine_dir, feedback_rounds=0, mode="tile", tile_grid=(2, 2)) as rt:
        scores = frame_scores(rt, iter(frames), batch=4, on_frame=counts.append)
        want = [rt.process(f).scores for f in frames]
    assert counts == [4, 8, 11]
    for k in SCORE_NAMES:  # tile mode: a frame's score is its highest tile's, as its verdict reports
        np.testing.assert_allclose(scores[k], [w[k] for w in want], rtol=1e-5, atol=1e-7)
    with DefenseRuntime(engine_dir, feedback_rounds=1) as rt, pytest.raises(ValueError, match="feedback_rounds=0"):
        frame_scores(rt, iter(frames))


def test_applied_thresholds_are_used_and_the_replaced_ones_kept(engine_copy: Path) -> None:
    before = load_manifest(engine_copy)
    first = calibrate(_scores(200, seed=1), before.thresholds, 0.05, mode="resize", source="clip-1")
    apply_calibration(engine_copy, first)
    second = calibrate(_scores(200, seed=2), first.thresholds, 0.05, mode="tile", tile_grid=(2, 3), source="clip-2")
    after = apply_calibration(engine_copy, second)

    reloaded = load_manifest(engine_copy)  # engines untouched: their hashes still verify
    assert reloaded == after
    assert reloaded.thresholds == second.thresholds and reloaded.target_fpr == 0.05
    record = reloaded.calibration
    assert record["source"] == "clip-2" and record["mode"] == "tile" and record["tile_grid"] == [2, 3]
    assert record["previous"] == first.thresholds
    assert [h["source"] for h in record["history"]] == ["clip-1"]
    assert record["history"][0]["previous"] == before.thresholds  # the bundle's thresholds are kept
    assert reloaded.engines == before.engines and reloaded.parity == before.parity
    with DefenseRuntime(engine_copy) as rt:
        assert rt.thresholds == second.thresholds
