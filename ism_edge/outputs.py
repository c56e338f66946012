"""Outputs of ``ism-edge run``: the JSON-lines verdict log, annotated video or images, a window.

Output URIs follow jetson-utils' ``videoOutput``: ``file://out.mp4`` (or a plain path; ``.mp4``,
``.m4v``, ``.mov`` are written with the mp4v codec, ``.avi`` with MJPG, ``.mkv`` with XVID), a
folder (``out/`` — numbered JPEG images), ``display://0`` (an OpenCV window; needs an OpenCV
with GUI support). Nothing is left half-written: the video goes to a temporary file renamed into
place when it is closed, each image is written and renamed, and the verdict log is appended one
complete, flushed line per frame.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np

from ism_edge._io import _public_mode
from ism_edge.errors import MissingDependencyError, OutputError
from ism_edge.sources import IMAGE_EXTENSIONS

VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "XVID"}
IMAGE_PATTERN = "frame_{:06d}.jpg"  # the names ImageFolderOutput writes


@dataclass(frozen=True)
class OutputURI:
    """A parsed output: ``kind`` is ``video``, ``images`` or ``display``."""

    kind: str
    location: str
    text: str


def parse_output(text: str) -> OutputURI:
    """Parse an output URI (see the module docstring); raises :class:`OutputError` if unsupported."""
    raw = text.strip()
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", raw)
    if match is not None:
        scheme, rest = match.group(1).lower(), match.group(2)
        if scheme == "display":
            return OutputURI("display", rest or "0", raw)
        if scheme != "file":
            raise OutputError(
                f"output {raw!r}: scheme {scheme!r} is not supported: write a file (file://out.mp4), a folder, or use display://0"
            )
        raw_path = rest
    else:
        raw_path = raw
    path = Path(os.path.expanduser(raw_path))
    if raw_path.endswith(("/", os.sep)) or path.is_dir() or not path.suffix:
        return OutputURI("images", str(path), raw)
    if path.suffix.lower() not in VIDEO_CODECS:
        raise OutputError(
            f"output {raw}: extension {path.suffix!r} is not a supported video container ({', '.join(VIDEO_CODECS)}); "
            "or give a folder for images"
        )
    return OutputURI("video", str(path), raw)


@dataclass(frozen=True)
class OutputPath:
    """Where one output of a run goes: the ``option`` that named it (for the error), its ``path``,
    and whether it is a ``folder`` that numbered images are written into."""

    option: str
    path: Path
    folder: bool = False


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name one file: after resolving links, or as hard links of one inode."""
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def _inside(path: Path, folder: Path) -> bool:
    real, top = _real(path), _real(folder)
    return real == top or top in real.parents


def _collides(out: OutputPath, source: Path, source_is_folder: bool) -> bool:
    """Whether writing ``out`` could replace or add to what the source reads."""
    if _same(out.path, source):
        return True
    if source_is_folder:  # a file the folder source would read as one of its images
        return _real(out.path).parent == _real(source) and out.path.suffix.lower() in IMAGE_EXTENSIONS
    if out.folder:  # an image the output folder would write over
        return _real(source).parent == _real(out.path) and re.fullmatch(r"frame_\d{6}\.jpg", source.name) is not None
    return False


def check_output_paths(outputs: Sequence[OutputPath], *, source: Path | None = None, source_is_folder: bool = False,
                       engine_dir: Path | None = None) -> None:
    """Refuse, before anything is written, an output that would destroy something.

    An output may not be the ``source`` it reads (a video, image, image folder or device, also
    through a link), may not share its path with another output, and may not lie inside the
    ``engine_dir``. Raises a one-line :class:`OutputError` naming the option and both paths.
    """
    for i, out in enumerate(outputs):
        if engine_dir is not None and _inside(out.path, engine_dir):
            raise OutputError(f"{out.option} {out.path} is inside the engine directory {engine_dir}: "
                              "write it somewhere else (a run never changes its engines)")
        if source is not None and _collides(out, source, source_is_folder):
            raise OutputError(f"{out.option} {out.path} is the input {source}, or would write into it: "
                              "choose another path (a run never overwrites its input)")
        for other in outputs[:i]:
            if _same(out.path, other.path):
                raise OutputError(f"{other.option} {other.path} and {out.option} {out.path} are the same file: "
                                  "give each output its own path")


class VerdictLog:
    """Appends one JSON object per line to a file (or stdout for ``-``), flushed per line.

    Each line is written with a single ``write`` and flushed, so after Ctrl-C (which
    ``ism-edge run`` turns into a graceful stop) or a crash every finished frame is on disk. If
    an earlier run died mid-line, a newline is added first so the old partial line cannot merge
    with a new one.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self.lines = 0
        self._fh: IO[str]
        if self.path == "-":
            self._fh = sys.stdout
            self._own = False
            return
        p = Path(self.path)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            needs_newline = p.is_file() and p.stat().st_size > 0 and _last_byte(p) != b"\n"
            self._fh = open(p, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise OutputError(f"verdict log {p} cannot be opened for appending ({e.strerror}): check the path and permissions") from None
        self._own = True
        if needs_newline:
            self._fh.write("\n")
            self._fh.flush()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"
        try:
            self._fh.write(line)
            self._fh.flush()
        except OSError as e:
            raise OutputError(f"verdict log {self.path} cannot be written ({e.strerror}): check free disk space") from None
        self.lines += 1

    def close(self) -> None:
        if self._own and not self._fh.closed:
            self._fh.flush()
            with contextlib.suppress(OSError):
                os.fsync(self._fh.fileno())
            self._fh.close()


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


class FrameSink:
    """Somewhere annotated frames go. ``stop_requested`` lets a window end the run."""

    stop_requested = False

    def write(self, image: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        return None


class VideoFileOutput(FrameSink):
    """An annotated video file, written to a temporary sibling and renamed on :meth:`close`.

    The frame size is fixed by the first frame; later frames of another size (an image folder)
    are resized to it.
    """

    def __init__(self, path: str | os.PathLike[str], fps: float = 30.0) -> None:
        self.path = Path(path)
        self.fps = float(fps) if fps and fps > 0 else 30.0
        self.frames = 0
        suffix = self.path.suffix.lower()
        if suffix not in VIDEO_CODECS:
            raise OutputError(f"output {self.path}: unsupported video extension {suffix!r} ({', '.join(VIDEO_CODECS)})")
        self._fourcc = VIDEO_CODECS[suffix]
        self._writer: Any = None
        self._size: tuple[int, int] | None = None
        self._tmp: Path | None = None

    def _open(self, width: int, height: int) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".partial{self.path.suffix}", dir=self.path.parent)
            os.close(fd)
        except OSError as e:
            raise OutputError(f"output {self.path} cannot be created ({e.strerror}): check the folder and permissions") from None
        self._tmp = Path(tmp)
        writer = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter.fourcc(*self._fourcc), self.fps, (width, height))
        if not writer.isOpened():
            self._tmp.unlink(missing_ok=True)
            raise OutputError(f"output {self.path}: OpenCV cannot write {self._fourcc} video here: try an .avi output")
        self._writer = writer
        self._size = (width, height)

    def write(self, image: np.ndarray) -> None:
        h, w = image.shape[:2]
        if self._writer is None:
            self._open(w, h)
        assert self._size is not None
        if (w, h) != self._size:
            image = cv2.resize(image, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(np.ascontiguousarray(image))
        self.frames += 1

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.release()
        self._writer = None
        assert self._tmp is not None
        if self.frames:
            _public_mode(self._tmp)  # mkstemp made it 0600; give it the mode open() would
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)


class ImageFolderOutput(FrameSink):
    """Numbered JPEG images in a folder (``frame_000000.jpg``, …), each written atomically."""

    def __init__(self, folder: str | os.PathLike[str], pattern: str = IMAGE_PATTERN) -> None:
        self.folder = Path(folder)
        self.pattern = pattern
        self.frames = 0
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"output folder {self.folder} cannot be created ({e.strerror}): check the path") from None

    def write(self, image: np.ndarray) -> None:
        name = self.folder / self.pattern.format(self.frames)
        tmp = name.with_name(f".{name.stem}.partial{name.suffix}")
        if not cv2.imwrite(str(tmp), image):
            raise OutputError(f"image {name} cannot be written: check free disk space and permissions")
        os.replace(tmp, name)
        self.frames += 1


def opencv_has_gui() -> bool:
    """False for opencv-python-headless and other builds without a GUI backend."""
    match = re.search(r"GUI:\s*(\S+)", cv2.getBuildInformation())
    return bool(match and match.group(1).upper() not in ("NONE", "NO"))


class DisplayOutput(FrameSink):
    """An OpenCV window; closing it or pressing q / Esc asks the run to stop."""

    def __init__(self, name: str = "ism-edge") -> None:
        self.name = name
        if not opencv_has_gui():
            raise MissingDependencyError(
                "display://0 needs OpenCV with a GUI, and this OpenCV has none (opencv-python-headless): "
                "pip install opencv-python, write a file instead, or pass --headless"
            )
        try:
            cv2.namedWindow(self.name, cv2.WINDOW_NORMAL)
        except cv2.error as e:
            raise OutputError(f"display://0: cannot open a window ({str(e).strip().splitlines()[-1]}): is DISPLAY set? or pass --headless") from None
        self._shown = False

    def write(self, image: np.ndarray) -> None:
        cv2.imshow(self.name, image)
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), 27):
            self.stop_requested = True
        if self._shown and cv2.getWindowProperty(self.name, cv2.WND_PROP_VISIBLE) < 1:
            self.stop_requested = True
        self._shown = True

    def close(self) -> None:
        with contextlib.suppress(cv2.error):
            cv2.destroyWindow(self.name)


def open_output(uri: OutputURI | str, *, fps: float = 30.0) -> FrameSink:
    """The sink for an output URI."""
    parsed = uri if isinstance(uri, OutputURI) else parse_output(uri)
    if parsed.kind == "display":
        return DisplayOutput()
    if parsed.kind == "images":
        return ImageFolderOutput(parsed.location)
    return VideoFileOutput(parsed.location, fps=fps)
