"""The annotated video's encoder: H.264 when one really works here, else MPEG-4 Part 2 with a note."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from ism_edge import encoders
from ism_edge.encoders import Encoder, choose_encoder, even_size, opencv_encoder, works
from ism_edge.outputs import VideoFileOutput
from tests.ism_edge.conftest import count_video_frames


@pytest.fixture(autouse=True)
def _fresh_probe() -> Iterator[None]:
    encoders._first_working_h264.cache_clear()  # the probe's answer is cached per process
    yield
    encoders._first_working_h264.cache_clear()


def _cannot_open(path: Path, fps: float, size: tuple[int, int]) -> encoders.VideoWriter:
    raise RuntimeError("no such encoder")


class _Garbage:
    """Opens and takes frames, but leaves a file no reader can play (an encoder that lies)."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int]) -> None:
        self.path = path

    def write(self, frame: np.ndarray) -> bool:
        with open(self.path, "ab") as f:
            f.write(b"\x00garbage")
        return True

    def release(self) -> None:
        pass


class _Recording:
    """A working stand-in for an H.264 encoder (OpenCV's MJPG underneath) that records the frames it gets."""

    frames: list[np.ndarray] = []

    def __init__(self, path: Path, fps: float, size: tuple[int, int]) -> None:
        self._writer = encoders._OpenCVWriter(path, "MJPG", fps, size)

    def write(self, frame: np.ndarray) -> bool:
        _Recording.frames.append(frame.copy())
        return self._writer.write(frame)

    def release(self) -> None:
        self._writer.release()


BROKEN = Encoder("broken", "avc1", _cannot_open, even_size=True)
LIAR = Encoder("liar", "avc1", _Garbage, even_size=True)
GOOD = Encoder("good", "avc1", _Recording, even_size=True)


def test_the_first_h264_encoder_that_really_writes_a_readable_file_is_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoders, "h264_candidates", lambda: [BROKEN, LIAR, GOOD])
    assert not works(BROKEN) and not works(LIAR) and works(GOOD)
    assert choose_encoder(".MP4") == (GOOD, None)


def test_without_a_working_h264_encoder_an_mp4_is_mpeg4_with_one_note(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    monkeypatch.setattr(encoders, "h264_candidates", lambda: [BROKEN, LIAR])
    encoder, note = choose_encoder(".mp4")
    assert (encoder.name, encoder.fourcc, encoder.codec) == ("OpenCV", "mp4v", "MPEG-4 Part 2")
    out = VideoFileOutput(tmp_path / "out.mp4", fps=5)
    assert out.note is not None and str(tmp_path / "out.mp4") in out.note and "ism-edge[video]" in out.note
    assert "\n" not in out.note and note is not None
    for v in (0, 128, 255):
        out.write(np.full((48, 64, 3), v, np.uint8))
    out.close()
    assert count_video_frames(tmp_path / "out.mp4") == 3


def test_avi_and_mkv_never_probe_for_h264(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> list[Encoder]:
        raise AssertionError("probed")

    monkeypatch.setattr(encoders, "h264_candidates", fail)
    assert choose_encoder(".avi")[0].fourcc == "MJPG" and choose_encoder(".mkv")[0].fourcc == "XVID"
    assert choose_encoder(".avi")[1] is None


def test_h264_frames_of_odd_size_are_cropped_to_even_not_resampled(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.setattr(encoders, "h264_candidates", lambda: [GOOD])
    _Recording.frames = []
    out = VideoFileOutput(tmp_path / "out.mp4", fps=5)
    assert out.note is None and out.encoder is GOOD
    frame = np.random.default_rng(0).integers(0, 256, (121, 161, 3), dtype=np.uint8)
    out.write(frame)
    out.close()
    assert even_size(161, 121) == (160, 120) and even_size(1, 1) == (2, 2)
    assert np.array_equal(_Recording.frames[-1], frame[:120, :160])


def test_opencv_avc1_is_used_exactly_when_it_works(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenCV's pip wheels list avc1 but cannot open it: the probe decides instead of failing a run."""
    avc1 = opencv_encoder("avc1")
    assert avc1.even_size and avc1.describe() == "H.264, OpenCV" == encoders.h264_candidates()[0].describe()
    monkeypatch.setattr(encoders, "h264_candidates", lambda: [avc1])
    encoder, note = choose_encoder(".mov")
    assert (encoder.fourcc == "avc1") == works(avc1) == (note is None)


@pytest.mark.skipif(importlib.util.find_spec("av") is None, reason="PyAV (ism-edge[video]) is not installed")
def test_with_pyav_an_mp4_is_h264_that_opencv_reads_back(tmp_path: Path) -> None:
    out = VideoFileOutput(tmp_path / "out.mp4", fps=5)
    assert out.encoder.codec == "H.264" and out.note is None
    for v in range(4):
        out.write(np.full((121, 161, 3), 60 * v, np.uint8))
    out.close()
    cap = cv2.VideoCapture(str(tmp_path / "out.mp4"))
    fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode().lower()
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    cap.release()
    assert fourcc in ("avc1", "h264") and size == (160, 120)
    assert count_video_frames(tmp_path / "out.mp4") == 4
