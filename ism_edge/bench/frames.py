"""Benchmark frames: camera-like BGR frames made from real photographs (a slow pan over them).

The photographs default to the three shipped with the package (``ism_edge/bench/photos``, whose
README gives their sources and licences), so that a wheel install can run the bench; any folder of
images works (``--images DIR``). Frames are deterministic, so every column of a benchmark,
and every run, sees the same pixels.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from ism_edge.errors import SourceError
from ism_edge.sources import IMAGE_EXTENSIONS

DEFAULT_PHOTOS = Path(__file__).resolve().parent / "photos"  # package data (pyproject.toml)
DEFAULT_FRAME_SIZE = (480, 640)  # (height, width): VGA, a common camera mode


def load_photos(folder: str | Path | None = None) -> list[np.ndarray]:
    """The BGR uint8 images of ``folder`` (default: the photographs shipped with the package)."""
    folder = Path(folder) if folder is not None else DEFAULT_PHOTOS
    if not folder.is_dir():
        raise SourceError(f"photo folder {folder} does not exist: pass --images DIR with a few photographs")
    read = (
        cv2.imread(str(p), cv2.IMREAD_COLOR) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS
    )
    images: list[np.ndarray] = [np.asarray(im) for im in read if im is not None]
    if not images:
        raise SourceError(
            f"photo folder {folder} has no readable images ({', '.join(IMAGE_EXTENSIONS)}): pass --images DIR"
        )
    return images


def camera_frames(count: int, size: tuple[int, int] = DEFAULT_FRAME_SIZE, photos: list[np.ndarray] | None = None,
                  *, per_photo: int = 30) -> Iterator[np.ndarray]:
    """``count`` BGR uint8 frames of ``size`` (height, width): a pan over each photo in turn.

    Every ``per_photo`` frames the camera moves to the next photograph (after the last, the first
    again: frames repeat once ``count`` exceeds ``per_photo × len(photos)``); within a photo the
    crop (80 % of it) slides a few pixels per frame, as a hand-held camera would.
    """
    if per_photo < 2:
        raise ValueError(f"per_photo must be >= 2, got {per_photo}")
    photos = photos if photos is not None else load_photos()
    h, w = size
    for i in range(count):
        im = photos[(i // per_photo) % len(photos)]
        ih, iw = im.shape[:2]
        ch, cw = int(ih * 0.8), int(iw * 0.8)
        step = i % per_photo
        y = (step * (ih - ch)) // (per_photo - 1)
        x = (step * (iw - cw)) // (per_photo - 1)
        yield cv2.resize(im[y : y + ch, x : x + cw], (w, h), interpolation=cv2.INTER_AREA)


def write_video(path: str | Path, count: int, fps: float = 30.0, size: tuple[int, int] = DEFAULT_FRAME_SIZE,
                photos: list[np.ndarray] | None = None, *, per_photo: int = 30) -> Path:
    """Write :func:`camera_frames` at ``fps``; returns the path.

    The codec follows the suffix: ``.mkv`` lossless FFV1 (every pixel as generated), anything else
    MPEG-4 (mp4v).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    fourcc = "FFV1" if path.suffix.lower() == ".mkv" else "mp4v"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), float(fps), (w, h))
    if not writer.isOpened():
        raise SourceError(f"OpenCV cannot write the benchmark video {path}: check the folder, or pass --video FILE")
    try:
        for frame in camera_frames(count, size, photos, per_photo=per_photo):
            writer.write(frame)
    finally:
        writer.release()
    return path
