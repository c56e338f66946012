"""Annotated frames: frame number, label, scores, a green (clean) or red (flagged) border and status
box, tile heat map, FPS."""

from __future__ import annotations

import cv2
import numpy as np

from ism_edge.manifest import MAX_THRESHOLD
from ism_edge.verdict import Verdict

GREEN = (0, 190, 0)  # BGR
RED = (0, 0, 220)  # white text on it: contrast ratio 5.2 (WCAG AA asks 4.5); black on GREEN: 8.4
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
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


def border_width(height: int, width: int) -> int:
    """The verdict border: about 2.5 % of the shorter side, at least 6 px, so that it is seen at a glance."""
    return max(6, round(min(height, width) / 40))


def format_score(value: float) -> str:
    """A score or threshold: three decimals always (no ``1e+03``, no ``0.1`` next to ``0.245``);
    a threshold at MAX_THRESHOLD (a detector turned off) is ``off``."""
    if not np.isfinite(value):
        return "nan"
    return "off" if value >= MAX_THRESHOLD else f"{value:.3f}"


def verdict_lines(verdict: Verdict, *, fps: float | None = None, frame: int | None = None) -> list[str]:
    """The text panel of an annotated frame, one string a line: frame number, label and confidence,
    each score against its threshold, FPS. Percentages and rates have one decimal, scores three."""
    lines = [] if frame is None else [f"frame {frame:,}"]
    lines.append(f"{verdict.label} {verdict.confidence:.1%}")
    lines += [f"{SHORT.get(k, k)} {format_score(v)} / {format_score(verdict.thresholds[k])}"
              + (" !" if k in verdict.flagged_by else "") for k, v in verdict.scores.items()]
    if fps is not None:
        lines.append(f"{fps:.1f} FPS")
    return lines


def flag_text(verdict: Verdict) -> str:
    """The status box: ``FLAGGED: recon, P`` or ``clean``."""
    return "FLAGGED: " + ", ".join(SHORT.get(s, s) for s in verdict.flagged_by) if verdict.flagged else "clean"


def annotate(image: np.ndarray, verdict: Verdict, *, fps: float | None = None, frame: int | None = None) -> np.ndarray:
    """A copy of the BGR ``image`` with the verdict drawn on it (the input is not modified): a thick
    green (clean) or red (flagged) border, a status box (white on solid red for FLAGGED, outlined in
    black so it stands out on any picture), and a panel with the frame number, label and scores."""
    out = np.ascontiguousarray(
        image if image.ndim == 3 and image.shape[2] == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    )
    out = heat_overlay(out.copy(), verdict)
    h, w = out.shape[:2]
    colour = RED if verdict.flagged else GREEN
    border = border_width(h, w)
    for band in (out[:border], out[h - border:], out[:, :border], out[:, w - border:]):  # all of it inside
        band[:] = colour

    scale = float(np.clip(min(h, w) / 700.0, 0.3, 1.2))
    thick = 1 if scale < 0.8 else 2
    font = cv2.FONT_HERSHEY_SIMPLEX
    (_, th), base = cv2.getTextSize("Ag", font, scale, thick)
    step = th + base + 2

    # the status box, top left inside the border: bold text on a solid box
    status = flag_text(verdict)
    box_scale, box_thick = scale * 1.25, thick + 1
    (sw, sh), sbase = cv2.getTextSize(status, font, box_scale, box_thick)
    x0, y0 = border + 2, border + 2
    x1, y1 = min(w - 1, x0 + sw + 10), min(h - 1, y0 + sh + sbase + 8)
    cv2.rectangle(out, (x0, y0), (x1, y1), colour, thickness=-1)
    cv2.rectangle(out, (x0, y0), (x1, y1), BLACK, thickness=2)
    cv2.putText(out, status, (x0 + 5, y0 + 4 + sh), font, box_scale, WHITE if verdict.flagged else BLACK,
                box_thick, cv2.LINE_AA)

    # the panel below it: white text on the darkened picture
    lines = verdict_lines(verdict, fps=fps, frame=frame)
    width = max(cv2.getTextSize(t, font, scale, thick)[0][0] for t in lines)
    py0 = y1 + 3
    px1, py1 = min(w - 1, x0 + width + 6), min(h - 1, py0 + step * len(lines) + 4)
    if py0 < py1 and x0 < px1:
        panel = out[py0:py1, x0:px1]
        panel[:] = (panel * 0.35).astype(np.uint8)
    for i, text in enumerate(lines):
        cv2.putText(out, text, (x0 + 3, py0 + 2 + th + i * step), font, scale, WHITE, thick, cv2.LINE_AA)
    return out
