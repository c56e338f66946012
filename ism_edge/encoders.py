"""Video encoders for the annotated video of ``ism-edge run``: H.264 where one is available.

Browsers and most players do not play MPEG-4 Part 2 (``mp4v``), the only MP4 codec OpenCV's pip
wheels can write; they all play H.264. For ``.mp4``/``.m4v``/``.mov`` outputs the first of these
that *really* writes a readable H.264 file here is used (each is tried once per process on a
tiny file, because an encoder can be listed and still fail to open, e.g. OpenCV asking a
``h264_v4l2m2m`` device that does not exist):

1. OpenCV's own ``avc1`` (OpenCV built with an H.264 encoder: some distribution and JetPack builds);
2. PyAV (``av``, ``pip install 'ism-edge[video]'``; its wheels ship FFmpeg with libx264);
3. imageio-ffmpeg (its wheels ship an ``ffmpeg`` binary with libx264).

Without any of them the video is MPEG-4 Part 2, with one note saying how to get H.264. ``.avi``
(MJPG) and ``.mkv`` (XVID) are written by OpenCV as before. PyAV and imageio-ffmpeg are imported
only here, only when an H.264 video is asked for.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

H264_CONTAINERS = (".mp4", ".m4v", ".mov")
OPENCV_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "XVID"}
CODEC_NAMES = {"avc1": "H.264", "mp4v": "MPEG-4 Part 2", "MJPG": "Motion JPEG", "XVID": "MPEG-4 Part 2 (Xvid)"}
FALLBACK_NOTE = ("no H.264 encoder here, so {path} is MPEG-4 Part 2 (mp4v), which browsers and many players do not "
                 "play: pip install 'ism-edge[video]' (PyAV) for H.264, or write an .avi (MJPG)")


class VideoWriter(Protocol):
    """What :class:`ism_edge.outputs.VideoFileOutput` needs of an encoder: ``write`` returns False
    (never raises) when a frame could not be written; ``release`` finishes the file."""

    def write(self, frame: np.ndarray) -> bool: ...

    def release(self) -> None: ...


@dataclass(frozen=True)
class Encoder:
    """One way to write a video file: ``open(path, fps, (width, height))`` returns a :class:`VideoWriter`
    or raises ``OSError``/``RuntimeError``; ``even_size``: the frame size must be even (YUV 4:2:0)."""

    name: str  # who encodes: "OpenCV", "PyAV", "imageio-ffmpeg"
    fourcc: str  # what: a key of CODEC_NAMES
    open: Callable[[Path, float, tuple[int, int]], VideoWriter]
    even_size: bool = False

    @property
    def codec(self) -> str:
        return CODEC_NAMES.get(self.fourcc, self.fourcc)

    def describe(self) -> str:
        return f"{self.codec}, {self.name}"


class _OpenCVWriter:
    def __init__(self, path: Path, fourcc: str, fps: float, size: tuple[int, int]) -> None:
        self._writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), fps, size)
        if not self._writer.isOpened():
            raise RuntimeError(f"OpenCV cannot write {fourcc} video here")

    def write(self, frame: np.ndarray) -> bool:
        return self._writer.write(frame) is not False  # OpenCV >= 5 reports a failed write; 4.x returns None

    def release(self) -> None:
        self._writer.release()


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)  # 29.97 → 30000/1001


class _PyAVWriter:
    """libx264 through PyAV, in this process; ``+faststart`` puts the index first, as browsers want."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int]) -> None:
        import av

        self._container = av.open(str(path), mode="w", format="mp4" if path.suffix != ".mov" else "mov",
                                  options={"movflags": "+faststart"})
        try:
            self._stream = self._container.add_stream("libx264", rate=_rate(fps))
            self._stream.width, self._stream.height = size
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"preset": "veryfast", "crf": "23"}
            self._frame_type = av.VideoFrame
        except BaseException:
            self._container.close()
            raise

    def write(self, frame: np.ndarray) -> bool:
        try:
            for packet in self._stream.encode(self._frame_type.from_ndarray(frame, format="bgr24")):
                self._container.mux(packet)
        except Exception:  # noqa: BLE001 - av's errors (disk full: an OSError subclass) mean "not written"
            return False
        return True

    def release(self) -> None:
        try:
            for packet in self._stream.encode(None):  # flush the frames the encoder still holds
                self._container.mux(packet)
        except Exception:  # noqa: BLE001 - the read-back in VideoFileOutput.close finds what is missing
            pass
        finally:
            with contextlib.suppress(Exception):  # writing the index on a full disk: found by the read-back too
                self._container.close()


class _FFmpegWriter:
    """libx264 through imageio-ffmpeg's ``ffmpeg`` binary, fed raw BGR frames on a pipe."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int]) -> None:
        import imageio_ffmpeg

        self._frames = imageio_ffmpeg.write_frames(
            str(path), size, pix_fmt_in="bgr24", pix_fmt_out="yuv420p", fps=float(fps), codec="libx264",
            quality=None, macro_block_size=2, ffmpeg_log_level="error",
            output_params=["-preset", "veryfast", "-crf", "23", "-movflags", "+faststart"],
        )  # fmt: skip
        self._frames.send(None)  # starts ffmpeg

    def write(self, frame: np.ndarray) -> bool:
        try:
            self._frames.send(np.ascontiguousarray(frame).tobytes())
        except Exception:  # noqa: BLE001 - ffmpeg died (disk full, file-size limit): not written
            return False
        return True

    def release(self) -> None:
        with contextlib.suppress(Exception):  # the read-back in VideoFileOutput.close finds what is missing
            self._frames.close()


def opencv_encoder(fourcc: str) -> Encoder:
    return Encoder("OpenCV", fourcc, lambda path, fps, size: _OpenCVWriter(path, fourcc, fps, size),
                   even_size=fourcc == "avc1")


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


PYAV = Encoder("PyAV", "avc1", _PyAVWriter, even_size=True)
IMAGEIO_FFMPEG = Encoder("imageio-ffmpeg", "avc1", _FFmpegWriter, even_size=True)


def h264_candidates() -> list[Encoder]:
    """The H.264 encoders to try, in order (PyAV and imageio-ffmpeg only where installed)."""
    found = [opencv_encoder("avc1")]
    if _has_module("av"):
        found.append(PYAV)
    if _has_module("imageio_ffmpeg"):
        found.append(IMAGEIO_FFMPEG)
    return found


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 for a probe: OpenCV's FFmpeg prints a failed encoder's errors there
    directly (not through Python), and a probe that fails is expected, not news."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded, pytest capture): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def works(encoder: Encoder, suffix: str = ".mp4") -> bool:
    """Whether ``encoder`` writes a file here that OpenCV reads back (two 64×64 frames in a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="ism-edge-probe-") as tmp, _quiet_stderr():
        path = Path(tmp) / f"probe{suffix}"
        try:
            writer = encoder.open(path, 30.0, (64, 64))
        except Exception:  # noqa: BLE001 - any failure to open means "not usable here"
            return False
        try:
            ok = all(writer.write(np.full((64, 64, 3), v, np.uint8)) for v in (0, 255))
        finally:
            with contextlib.suppress(Exception):
                writer.release()
        if not ok or not path.is_file() or path.stat().st_size == 0:
            return False
        cap = cv2.VideoCapture(str(path))
        try:
            return bool(cap.isOpened() and cap.read()[0])
        finally:
            cap.release()


@functools.cache
def _first_working_h264() -> Encoder | None:
    return next((enc for enc in h264_candidates() if works(enc)), None)


def choose_encoder(suffix: str) -> tuple[Encoder, str | None]:
    """The encoder for a video file with extension ``suffix`` (one of OPENCV_CODECS) and, when an
    MP4 falls back to MPEG-4 Part 2, the note to show (``{path}`` to be filled in)."""
    suffix = suffix.lower()
    if suffix in H264_CONTAINERS:
        h264 = _first_working_h264()
        if h264 is not None:
            return h264, None
        return opencv_encoder(OPENCV_CODECS[suffix]), FALLBACK_NOTE
    return opencv_encoder(OPENCV_CODECS[suffix]), None


def even_size(width: int, height: int) -> tuple[int, int]:
    """The largest even size within ``width``×``height`` (at least 2×2): YUV 4:2:0 needs even sides."""
    return max(2, width - width % 2), max(2, height - height % 2)


__all__ = ["Encoder", "VideoWriter", "choose_encoder", "even_size", "h264_candidates", "opencv_encoder", "works"]
