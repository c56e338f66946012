"""Detector thresholds from a deployment's own clean frames: no labels, no torch (``ism-edge calibrate``).

A bundle's thresholds are the (1 − target FPR) quantile of each detector's score on held-out
training images (MagNet's rule, ``ism_edge_training.recipe.stages.calibrate_thresholds``). A camera does not
see those images, so on clean camera frames the detectors flag far more than the target FPR
(docs/runtime.md, "ism-edge calibrate"). Calibration applies the same rule to the scores of
frames the user vouches are clean, taken *per frame* as the runtime reports them — in tile mode the
maximum over the frame's tiles — so ``fpr`` is the share of clean frames each detector flags, in the
mode the deployment runs. The detectors are scored without feedback rounds, as training calibrates.

The engine manifest is rewritten atomically with the new thresholds; its ``calibration`` record
keeps the thresholds they replaced (and the earlier records), so nothing is lost and
``ism-edge build`` from the bundle restores the bundle's thresholds.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ism_edge.errors import DataError
from ism_edge.manifest import SCORE_NAMES, EngineManifest, load_manifest

if TYPE_CHECKING:
    from ism_edge.runtime import DefenseRuntime

#: A threshold is trusted when at least this many calibration frames are expected above it.
MIN_EXCEEDANCES = 5
#: Earlier calibration records kept in the manifest.
HISTORY = 10


def min_frames(fpr: float) -> int:
    """Clean frames needed to calibrate a false-positive rate of ``fpr`` per detector."""
    return math.ceil(MIN_EXCEEDANCES / fpr - 1e-9)


@dataclass(frozen=True)
class Calibration:
    """New thresholds and what they do on the calibration frames.

    ``fpr_before``/``fpr_after``: per detector, the share of the calibration frames above the
    previous / new threshold; ``any_*``: above any detector's.
    """

    thresholds: dict[str, float]
    previous: dict[str, float]
    target_fpr: float
    frames: int
    mode: str
    tile_grid: list[int] | None
    source: str
    fpr_before: dict[str, float]
    fpr_after: dict[str, float]
    any_before: float
    any_after: float
    created: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def frame_scores(
    runtime: DefenseRuntime,
    frames: Iterable[np.ndarray],
    *,
    batch: int = 8,
    on_frame: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Each detector's score per frame (float64 ``[n]``), judged ``batch`` frames at a time.

    ``runtime`` must run without feedback rounds (``RuntimeOptions(feedback_rounds=0)``);
    ``on_frame(count)`` is called after every batch with the frames judged so far.
    """
    if runtime.backend.feedback_rounds != 0:
        raise ValueError("calibrate with feedback_rounds=0: thresholds are defined on the detectors' first pass")
    scores: dict[str, list[float]] = {k: [] for k in SCORE_NAMES}
    pending: list[np.ndarray] = []

    def judge() -> None:
        for verdict in runtime.process_batch(pending):
            for k in SCORE_NAMES:
                scores[k].append(float(verdict.scores[k]))
        pending.clear()
        if on_frame is not None:
            on_frame(len(scores[SCORE_NAMES[0]]))

    for frame in frames:
        pending.append(frame)
        if len(pending) >= batch:
            judge()
    if pending:
        judge()
    return {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}


def calibrate(
    scores: dict[str, np.ndarray],
    previous: dict[str, float],
    fpr: float,
    *,
    mode: str,
    tile_grid: tuple[int, int] | None = None,
    source: str = "",
) -> Calibration:
    """Thresholds at the (1 − ``fpr``) quantile (``method="higher"``) of each detector's scores.

    Raises :class:`~ism_edge.errors.DataError` when there are fewer than :func:`min_frames` frames
    or a score is not finite.
    """
    if not 0.0 < fpr < 0.5:
        raise ValueError(f"fpr must be in (0, 0.5), got {fpr}")
    n = len(scores[SCORE_NAMES[0]])
    need = min_frames(fpr)
    if n < need:
        raise DataError(
            f"{n} frame{'s' if n != 1 else ''} are too few to calibrate a {fpr:.2%} false-positive rate "
            f"(needs at least {need}: {MIN_EXCEEDANCES} expected above each threshold): "
            f"record more clean frames or raise --fpr"
        )
    for k in SCORE_NAMES:
        if not np.isfinite(scores[k]).all():
            raise DataError(
                f"the {k} score is not finite on some frames: the engines or frames are broken; rebuild the engines"
            )
    new = {k: float(np.quantile(scores[k], 1.0 - fpr, method="higher")) for k in SCORE_NAMES}

    def rates(thresholds: dict[str, float]) -> tuple[dict[str, float], float]:
        above = {k: scores[k] > thresholds[k] for k in SCORE_NAMES}
        any_flag = np.logical_or.reduce([above[k] for k in SCORE_NAMES])
        return {k: float(v.mean()) for k, v in above.items()}, float(any_flag.mean())

    before, any_before = rates(previous)
    after, any_after = rates(new)
    return Calibration(
        thresholds=new, previous={k: float(previous[k]) for k in SCORE_NAMES}, target_fpr=float(fpr), frames=n,
        mode=mode, tile_grid=None if tile_grid is None else list(tile_grid), source=source,
        fpr_before=before, fpr_after=after, any_before=any_before, any_after=any_after,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def apply_calibration(engine_dir: str | Path, calibration: Calibration) -> EngineManifest:
    """Write ``calibration``'s thresholds into the engine manifest (atomically) and return it.

    The manifest's ``calibration`` becomes this record plus ``history``: the earlier records
    (newest first, at most :data:`HISTORY`), each with the thresholds it replaced.
    """
    manifest = load_manifest(engine_dir, verify_files=False)
    earlier = dict(manifest.calibration)
    history = list(earlier.pop("history", []))
    if earlier:
        history.insert(0, earlier)
    record = {**calibration.to_json(), "history": history[:HISTORY]}
    updated = replace(manifest, thresholds=dict(calibration.thresholds), target_fpr=calibration.target_fpr,
                      calibration=record)
    updated.save(engine_dir)
    return updated
