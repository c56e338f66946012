"""Annotated frames: label, scores, a green (clean) or red (flagged) border, tile heat map, FPS."""

from __future__ import annotations

import cv2
import numpy as np

from ism_edge.verdict import Verdict

GREEN = (0, 190, 0)  # BGR
RED = (40, 40, 255)
SHORT = {"recon_error": "recon", "jsd": "jsd", "p_score": "P"}


def severity_color(value: float) -> tuple[int, int, int]:
    """BGR colour of a heat-map value: green at 0, yellow at the threshold (1), red from 2 up."""
    v = float(np.clip(value if np.isfinite(value) else 2.0, 0.0, 2.0)) / 2.0
    if v <= 0.5:
        return (0, int(190 + 65 * (v / 0.5)), int(255 * (v / 0.5)))
    return (0, int(255 * (1.0 - (v - 0.5) / 0.5)), 255)


def heat_overlay(image: np.ndarray, verdict: Verdict, alpha: float = 0.35) -> np.ndarray:
    """Blend each tile's severity colour over ``image`` and outline the flagged tiles."""
    tiles = verdict.tiles
    if tiles is None:
        return image
    layer = image.copy()
    for (x, y, w, h), sev in zip(tiles.boxes, tiles.severity, strict=True):
        cv2.rectangle(layer, (x, y), (x + w - 1, y + h - 1), severity_color(sev), thickness=-1)
    out = cv2.addWeighted(layer, alpha, image, 1.0 - alpha, 0.0)
    for (x, y, w, h), flagged in zip(tiles.boxes, tiles.flagged, strict=True):
        if flagged:
            cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), RED, thickness=1)
    return out


def annotate(image: np.ndarray, verdict: Verdict, *, fps: float | None = None) -> np.ndarray:
    """A copy of the BGR ``image`` with the verdict drawn on it (the input is not modified)."""
    out = np.ascontiguousarray(
        image if image.ndim == 3 and image.shape[2] == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    )
    out = heat_overlay(out.copy(), verdict)
    h, w = out.shape[:2]
    colour = RED if verdict.flagged else GREEN
    border = max(3, round(min(h, w) / 80))
    cv2.rectangle(out, (0, 0), (w - 1, h - 1), colour, thickness=border)

    lines = [
        f"{verdict.label} {verdict.confidence:.0%}",
        "FLAGGED: " + ", ".join(SHORT.get(s, s) for s in verdict.flagged_by) if verdict.flagged else "clean",
    ]
    lines += [f"{SHORT.get(k, k)} {v:.3g}/{verdict.thresholds[k]:.3g}" for k, v in verdict.scores.items()]
    if fps is not None:
        lines.append(f"{fps:.1f} FPS")
    scale = float(np.clip(min(h, w) / 700.0, 0.3, 1.2))
    thick = 1 if scale < 0.8 else 2
    (_, th), base = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    step = th + base + 2
    width = max(cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0] for t in lines)
    x0, y0 = border + 2, border + 2
    x1, y1 = min(w - 1, x0 + width + 6), min(h - 1, y0 + step * len(lines) + 4)
    panel = out[y0:y1, x0:x1]
    panel[:] = (panel * 0.4).astype(np.uint8)
    for i, text in enumerate(lines):
        y = y0 + 2 + th + i * step
        cv2.putText(out, text, (x0 + 3, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour if i == 1 else (255, 255, 255),
                    thick, cv2.LINE_AA)
    return out
