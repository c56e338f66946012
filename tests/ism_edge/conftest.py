"""Fixtures for the runtime tests: an engine directory built from the untrained bundle, test videos.

The engine directory comes from ``ism_edge_engines.build.build_engines`` (torch is used only to build it;
the runtime under test never imports torch). Test videos are made from the sample photographs in
``data/samples/photos``.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from ism_edge.errors import SourceError
from ism_edge.sources import FrameSource, SourceURI
from tests.conftest import SAMPLES

PHOTOS = SAMPLES / "photos"
PHOTO_NAMES = ("skimage_astronaut", "skimage_chelsea", "skimage_coffee", "sklearn_china")
VIDEO_SIZE = (160, 120)  # (width, height) of the generated test videos


def build_engine_dir(bundle_dir: Path, out_dir: Path) -> Path:
    """An ONNX Runtime FP32 engine directory built by ``ism_edge_engines.build.build_engines``.

    A small parity sample keeps the build to a few seconds; the parity gate still runs.
    """
    from ism_edge_engines.build import build_engines

    return Path(build_engines(bundle_dir, out_dir, backend="onnxruntime", precision="fp32", batch=(1, 8, 64),
                              parity_samples=16))


def edit_manifest(directory: Path, **changes: object) -> None:
    """Change fields of an engine directory's manifest.json in place (for tests)."""
    path = directory / "manifest.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw, indent=2))


def shared_engine_dir(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's engine directory of ``bundle_dir``, built once at a fixed place so that
    tests/ism_edge and tests/cli/test_run.py share it."""
    out = tmp_path_factory.getbasetemp() / "shared-engines" / bundle_dir.name
    if not (out / "manifest.json").is_file():
        build_engine_dir(bundle_dir, out)
    return out


def shared_sample_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's 12-frame 160×120 mp4 (mp4v) made from the sample photos, written once."""
    path = tmp_path_factory.getbasetemp() / "shared-video" / "clip.mp4"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        photos = [cv2.imread(str(PHOTOS / f"{name}.jpg"), cv2.IMREAD_COLOR) for name in PHOTO_NAMES]
        write_video(path, video_frames(photos, 12))
    return path


@pytest.fixture(scope="session")
def engine_dir(untrained_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only ONNX Runtime engine directory of the untrained `small` bundle (32×32, 10 classes)."""
    return shared_engine_dir(untrained_bundle_dir, tmp_path_factory)


@pytest.fixture
def engine_copy(engine_dir: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`engine_dir` that a test may modify or break."""
    dst = tmp_path / "engines"
    shutil.copytree(engine_dir, dst)
    return dst


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    """The four sample photographs (BGR uint8, different sizes)."""
    images = [cv2.imread(str(PHOTOS / f"{name}.jpg"), cv2.IMREAD_COLOR) for name in PHOTO_NAMES]
    assert all(im is not None for im in images)
    return images


def video_frames(photos: list[np.ndarray], count: int, size: tuple[int, int] = VIDEO_SIZE) -> list[np.ndarray]:
    """``count`` frames cycling through the photos, each a slightly different crop (a moving camera)."""
    w, h = size
    frames = []
    for i in range(count):
        im = photos[i % len(photos)]
        dy, dx = (i * 7) % 40, (i * 11) % 40
        crop = im[dy : im.shape[0] - 40 + dy, dx : im.shape[1] - 40 + dx]
        frames.append(cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA))
    return frames


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    fourcc = "MJPG" if path.suffix == ".avi" else "mp4v"
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def count_video_frames(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


@pytest.fixture(scope="session")
def sample_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-frame 160×120 mp4 (mp4v) made from the sample photos."""
    return shared_sample_video(tmp_path_factory)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A folder with the four sample photos (JPEG, different sizes)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in PHOTO_NAMES:
        shutil.copy(PHOTOS / f"{name}.jpg", folder / f"{name}.jpg")
    return folder


class ScriptedSource(FrameSource):
    """A fake source: ``reads`` yields frames, ``None`` (lost / end), "block" or an exception;
    ``opens`` says whether each (re)open succeeds."""

    def __init__(self, reads: list[object], *, live: bool = True, opens: list[bool] | None = None) -> None:
        super().__init__(SourceURI("camera" if live else "video", "fake", "fake://source"))
        self.reads = list(reads)
        self.opens = list(opens or [])
        self.open_calls = 0
        self.release = threading.Event()

    def open(self) -> None:
        self.open_calls += 1
        if self.opens and not self.opens.pop(0):
            raise SourceError("fake camera could not be opened")

    def read(self) -> np.ndarray | None:
        if not self.reads:
            return None
        item = self.reads.pop(0)
        if isinstance(item, str) and item == "block":
            self.release.wait(10)
            return None
        if isinstance(item, Exception):
            raise item
        return item  # type: ignore[return-value]
