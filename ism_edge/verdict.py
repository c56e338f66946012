"""The verdict on one frame: label, confidence, detector scores, flagged, timings (docs/runtime.md lists the fields)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _num(value: float, digits: int = 6) -> float | None:
    """A JSON-safe float: rounded, and ``None`` for NaN/inf (JSON has neither)."""
    v = float(value)
    return round(v, digits) if math.isfinite(v) else None


def severity(scores: dict[str, float], thresholds: dict[str, float]) -> float:
    """max over detectors of score / threshold: above 1 means flagged (the heat-map value)."""
    return max(
        (s / t if t > 0 else (math.inf if s > t else 0.0)) for s, t in ((scores[k], thresholds[k]) for k in thresholds)
    )


@dataclass(frozen=True)
class TileScores:
    """Per-tile results of a frame processed in tile mode (row-major, ``rows × cols`` tiles).

    ``boxes`` are ``(x, y, w, h)`` in the pixels of the original frame; ``severity`` is the
    heat-map value of each tile (see :func:`severity`).
    """

    rows: int
    cols: int
    boxes: tuple[tuple[int, int, int, int], ...]
    scores: dict[str, tuple[float, ...]]
    flagged: tuple[bool, ...]
    labels: tuple[str, ...]
    severity: tuple[float, ...]

    def heat_map(self) -> np.ndarray:
        """Severity as a ``rows × cols`` float32 array."""
        return np.asarray(self.severity, dtype=np.float32).reshape(self.rows, self.cols)

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "cols": self.cols,
            "boxes": [list(b) for b in self.boxes],
            "scores": {k: [_num(v) for v in vs] for k, vs in self.scores.items()},
            "flagged": list(self.flagged),
            "labels": list(self.labels),
            "severity": [_num(v, 4) for v in self.severity],
        }


@dataclass(frozen=True)
class Verdict:
    """What the defense says about one frame.

    ``label``/``confidence``: argmax of softmax(C(x̂)/T_deploy) and its probability (tile mode:
    of the tiles' mean probabilities). ``scores``: the detector scores (``recon_error``, ``jsd``,
    ``p_score``; tile mode: the maximum over tiles), ``flagged``: any score above its calibrated
    ``thresholds`` entry, ``flagged_by``: which. ``timings_ms``: per stage (preprocess, upload,
    mapping, classifier, detectors, download, postprocess, total) in milliseconds, for the batch the
    frame ran in. ``purified``: the reformed image x̂ (``H×W×3`` uint8 in the caller's colour order,
    model resolution in resize mode, tiled resolution in tile mode) when requested.
    """

    label: str
    label_index: int
    confidence: float
    scores: dict[str, float]
    thresholds: dict[str, float]
    flagged: bool
    flagged_by: tuple[str, ...]
    timings_ms: dict[str, float]
    feedback_rounds: int = 0
    mode: str = "resize"
    frame_size: tuple[int, int] = (0, 0)  # (height, width)
    tiles: TileScores | None = None
    purified: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def severity(self) -> float:
        """max(score / threshold) over the detectors; above 1 means flagged."""
        return severity(self.scores, self.thresholds)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (no image): one line of the verdict log."""
        out: dict[str, Any] = {
            "label": self.label,
            "label_index": self.label_index,
            "confidence": _num(self.confidence),
            "flagged": self.flagged,
            "flagged_by": list(self.flagged_by),
            "scores": {k: _num(v) for k, v in self.scores.items()},
            "thresholds": {k: _num(v) for k, v in self.thresholds.items()},
            "feedback_rounds": self.feedback_rounds,
            "mode": self.mode,
            "frame_size": list(self.frame_size),
            "timings_ms": {k: _num(v, 3) for k, v in self.timings_ms.items()},
        }
        if self.tiles is not None:
            out["tiles"] = self.tiles.to_json()
        return out
