"""One tiled picture of several sources: ``ism-edge run ENGINE_DIR IN1 IN2 … --mosaic OUTPUT``.

An operator watching N cameras wants one window (or one recording) rather than N, as
DeepStream's ``nvmultistreamtiler`` gives: every source gets a cell of a fixed size in a
rows × columns grid, its latest annotated frame is scaled into the cell keeping its aspect ratio
(black bars fill the rest), and a label names the source (its index and a short form of its URI,
without any user name or password). A source without a frame shows a black cell saying why:
``no signal`` (not opened yet, or no frame yet), ``ended`` (a file or folder at its end, or
``--max-frames`` reached) or ``failed`` (it could not be opened, stalled or was lost).

:class:`Mosaic` composes into one canvas allocated once: a frame is resized straight into its
cell's view of the canvas, so composing costs one resize per judged frame and nothing per cell
that did not change. :meth:`Mosaic.write` hands the canvas to one sink (a video file, an image
folder or a window, :mod:`ism_edge.outputs`) once per batch of the multi-stream loop
(:func:`ism_edge.multi_stream.run_multi_stream`), not once per source frame.

From Python::

    from ism_edge.mosaic import Mosaic
    from ism_edge.multi_stream import MultiStream, run_multi_stream
    from ism_edge.outputs import VideoFileOutput

    multi = MultiStream(runtime, ["rtsp://cam1/s", "rtsp://cam2/s", "rtsp://cam3/s"])
    mosaic = Mosaic(VideoFileOutput("wall.mp4", fps=30), multi.uris)  # 2 × 2 cells of 640 × 480
    run_multi_stream(runtime, multi, mosaic=mosaic)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

import cv2
import numpy as np

from ism_edge.outputs import FrameSink

DEFAULT_CELL = (640, 480)  # (width, height) in pixels of one source's cell
MIN_CELL, MAX_CELL = 32, 4096  # the smallest cell side that still holds a label; the largest any encoder takes
STATES = ("no signal", "ended", "failed")  # what a cell without a frame says
_STATE_COLOUR = {"no signal": (170, 170, 170), "ended": (170, 170, 170), "failed": (0, 0, 220)}  # BGR
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def mosaic_grid(sources: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """The ``(rows, columns)`` of a mosaic of ``sources`` cells: ``grid`` if given (it must hold
    them all), else ⌈√N⌉ columns and as many rows as they need (2 → 1 × 2, 3 or 4 → 2 × 2,
    5 or 6 → 2 × 3, 7 to 9 → 3 × 3). Raises ``ValueError`` saying what is allowed."""
    if sources < 1:
        raise ValueError(f"a mosaic needs at least one source, got {sources}")
    if grid is None:
        cols = math.ceil(math.sqrt(sources))
        return math.ceil(sources / cols), cols
    rows, cols = grid
    if rows < 1 or cols < 1:
        raise ValueError(f"mosaic grid {rows}x{cols}: rows and columns must be >= 1")
    if rows * cols < sources:
        raise ValueError(f"mosaic grid {rows}x{cols} has {rows * cols} cells for {sources} sources: "
                         f"give at least {sources} cells (e.g. {'x'.join(map(str, mosaic_grid(sources)))})")
    return rows, cols


def check_cell(cell: tuple[int, int]) -> tuple[int, int]:
    """A cell size ``(width, height)`` in pixels, each side from MIN_CELL to MAX_CELL; ``ValueError`` otherwise."""
    width, height = cell
    if not (MIN_CELL <= width <= MAX_CELL and MIN_CELL <= height <= MAX_CELL):
        raise ValueError(f"mosaic cell {width}x{height}: each side must be {MIN_CELL} to {MAX_CELL} pixels")
    return int(width), int(height)


def short_uri(uri: str) -> str:
    """A source's URI as a cell label shows it: a file or folder by its name, a stream without its
    scheme and without ``user:password@``."""
    text = str(uri).strip()
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", text)
    if match is None:
        return PurePath(text).name or text
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "file":
        return PurePath(rest).name or rest
    host, sep, path = rest.partition("/")
    return host.rpartition("@")[2] + sep + path


def _fit(text: str, width: int, scale: float, thick: int) -> str:
    """``text``, cut in the middle (``..``) until it fits ``width`` pixels."""
    if cv2.getTextSize(text, _FONT, scale, thick)[0][0] <= width:
        return text
    keep = len(text)
    while keep > 1:
        keep -= 1
        head = (keep + 1) // 2
        cut = text[:head] + ".." + text[len(text) - (keep - head):]
        if cv2.getTextSize(cut, _FONT, scale, thick)[0][0] <= width:
            return cut
    return text[:1]


class _Cell(FrameSink):
    """One source's cell: a frame sink (so that the source's annotation is drawn once, for its
    own outputs and the mosaic alike) whose :meth:`write` copies the frame into the canvas."""

    kind = "mosaic cell"

    def __init__(self, mosaic: Mosaic, index: int) -> None:
        self.mosaic, self.index = mosaic, index

    def write(self, image: np.ndarray) -> None:
        self.mosaic.put(self.index, image)


class Mosaic:
    """Composes the latest annotated frame of every source into one grid image written to ``sink``.

    ``uris``: the sources in order (``MultiStream.uris``), for the labels. ``grid``: ``(rows,
    columns)``, chosen from the source count when None (:func:`mosaic_grid`). ``cell``: ``(width,
    height)`` of every cell in pixels. :meth:`cell` is the frame sink of source ``i``;
    :meth:`mark` shows a state (``no signal``, ``ended``, ``failed``) in its place;
    :meth:`write` writes the composed frame. Every cell starts as ``no signal``.
    """

    kind = "mosaic"

    def __init__(self, sink: FrameSink, uris: Sequence[str], *, grid: tuple[int, int] | None = None,
                 cell: tuple[int, int] = DEFAULT_CELL) -> None:
        self.sink = sink
        self.uris = [str(u) for u in uris]
        self.grid = mosaic_grid(len(self.uris), grid)
        self.cell_size = check_cell(cell)
        width, height = self.cell_size
        rows, cols = self.grid
        self.canvas = np.zeros((rows * height, cols * width, 3), np.uint8)  # every frame is composed here
        self.rounds = 0  # composed frames written
        self._cells = [_Cell(self, i) for i in range(len(self.uris))]
        self._states: list[str | None] = [None] * len(self.uris)  # what each cell shows instead of a frame
        self._pending: dict[int, str] = {}  # states to show from the next round without a frame of the source
        self._in_round: set[int] = set()  # sources with a frame since the last write
        self._boxes: list[tuple[int, int, int, int] | None] = [None] * len(self.uris)  # where the last frame went
        self._scale = float(np.clip(height / 800.0, 0.35, 1.0))
        self._thick = 1 if self._scale < 0.7 else 2
        self._labels = [_fit(f"{i} {short_uri(u)}", width - 12, self._scale, self._thick)
                        for i, u in enumerate(self.uris)]
        for i in range(len(self.uris)):
            self._show_state(i, "no signal")

    # -- the sink's figures, for the summary -------------------------------------------------------
    @property
    def path(self) -> Any:
        return self.sink.path

    @property
    def frames(self) -> int:
        return self.sink.frames

    @property
    def failed(self) -> bool:
        return self.sink.failed

    @property
    def stop_requested(self) -> bool:
        """The mosaic's window was closed (or q / Esc pressed in it)."""
        return self.sink.stop_requested

    def written(self) -> list[dict[str, Any]]:
        """The summary's entry for the mosaic (none for a window)."""
        if self.sink.path is None:
            return []
        return [{"output": self.kind, "path": str(self.sink.path), "frames": self.sink.frames,
                 "complete": not self.sink.failed}]

    # -- composing ---------------------------------------------------------------------------------
    def cell(self, index: int) -> FrameSink:
        """The frame sink of source ``index``: what is written to it becomes that source's cell."""
        return self._cells[index]

    def state(self, index: int) -> str | None:
        """What source ``index``'s cell says instead of a frame (None: it shows its latest frame)."""
        return self._states[index]

    def _view(self, index: int) -> np.ndarray:
        width, height = self.cell_size
        row, col = divmod(index, self.grid[1])
        return self.canvas[row * height:(row + 1) * height, col * width:(col + 1) * width]

    def put(self, index: int, image: np.ndarray) -> None:
        """Scale ``image`` (BGR or grey) into source ``index``'s cell, keeping its aspect ratio."""
        view = self._view(index)
        ch, cw = view.shape[:2]
        h, w = image.shape[:2]
        if h < 1 or w < 1:
            return
        scale = min(cw / w, ch / h)
        nw, nh = max(1, min(cw, round(w * scale))), max(1, min(ch, round(h * scale)))
        x, y = (cw - nw) // 2, (ch - nh) // 2
        if self._states[index] is not None or self._boxes[index] != (x, y, nw, nh):
            view[:] = 0  # a state cell, or a frame of another shape before: clear the bars
        self._states[index], self._boxes[index] = None, (x, y, nw, nh)
        self._in_round.add(index)
        if image.dtype != np.uint8:  # a float frame in [0, 1] from the Python API
            image = np.clip(np.asarray(image, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if image.ndim == 2 or image.shape[2] == 1:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        target = view[y:y + nh, x:x + nw]
        interpolation = cv2.INTER_AREA if nw < w else cv2.INTER_LINEAR
        out = cv2.resize(image, (nw, nh), dst=target, interpolation=interpolation)
        if out is not target and not np.shares_memory(out, target):  # OpenCV made a new array after all
            target[:] = out
        self._label(index, view)

    def mark(self, index: int, state: str) -> None:
        """Show ``state`` (one of STATES) in source ``index``'s cell instead of a frame, from the
        next written frame of a round without a frame of that source: a frame judged after the
        state became known (it was in flight when its source ended) is still shown first."""
        if state not in STATES:
            raise ValueError(f"mosaic cell state {state!r}: one of {', '.join(STATES)}")
        self._pending[index] = state

    def unmark(self, index: int) -> None:
        """Forget a state not shown yet (the source was opened after all)."""
        self._pending.pop(index, None)

    def _show_state(self, index: int, state: str) -> None:
        if self._states[index] == state:
            return
        self._states[index], self._boxes[index] = state, None
        view = self._view(index)
        view[:] = 0
        ch, cw = view.shape[:2]
        scale, thick = self._scale * 1.6, self._thick + 1
        (tw, th), _ = cv2.getTextSize(state, _FONT, scale, thick)
        cv2.putText(view, state, ((cw - tw) // 2, (ch + th) // 2), _FONT, scale, _STATE_COLOUR[state], thick,
                    cv2.LINE_AA)
        self._label(index, view)

    def _label(self, index: int, view: np.ndarray) -> None:
        """The source's index and short URI on a dark box at the bottom left of its cell."""
        text = self._labels[index]
        (tw, th), base = cv2.getTextSize(text, _FONT, self._scale, self._thick)
        ch = view.shape[0]
        x0, y1 = 4, ch - 4
        y0 = max(0, y1 - th - base - 6)
        cv2.rectangle(view, (x0, y0), (min(view.shape[1] - 1, x0 + tw + 8), y1), (32, 32, 32), thickness=-1)
        cv2.putText(view, text, (x0 + 4, y1 - base - 3), _FONT, self._scale, (255, 255, 255), self._thick,
                    cv2.LINE_AA)

    def write(self) -> None:
        """Write the composed frame of this round (the sources' latest frames, the states marked for
        the sources without a frame in it) to the sink; raises the sink's :class:`OutputError`."""
        for index in [i for i in self._pending if i not in self._in_round]:
            self._show_state(index, self._pending.pop(index))
        self._in_round.clear()
        self.sink.write(self.canvas)
        self.rounds += 1

    def close(self) -> None:
        """Close the sink (a video is finalised here); raises its :class:`OutputError`."""
        self.sink.close()
