"""Outputs of ``ism-edge run``: the JSON-lines verdict log, annotated video or images, a window.

Output URIs follow jetson-utils' ``videoOutput``: ``file://out.mp4`` (or a plain path; ``.mp4``,
``.m4v``, ``.mov`` are H.264 where an encoder is available, else MPEG-4 Part 2 with a note —
:mod:`ism_edge.encoders`; ``.avi`` is MJPG, ``.mkv`` XVID), a
folder (``out/`` — numbered JPEG images), ``display://0`` (an OpenCV window; needs an OpenCV
with GUI support). Nothing is left half-written: the video goes to a temporary file renamed into
place when it is closed (only if every frame reads back), each image is written and renamed, and
the verdict log is appended one whole line per frame (a line cut by a full disk is rolled back).
Every write is checked: one that fails raises :class:`OutputError`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np

from ism_edge._io import _public_mode
from ism_edge.encoders import OPENCV_CODECS, Encoder, VideoWriter, choose_encoder, even_size
from ism_edge.errors import MissingDependencyError, OutputError
from ism_edge.sources import IMAGE_EXTENSIONS

VIDEO_CODECS = OPENCV_CODECS  # the supported video extensions (H.264 replaces mp4v where it can)
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
                f"output {raw!r}: scheme {scheme!r} is not supported: "
                "write a file (file://out.mp4), a folder, or use display://0"
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


def new_run_id(now: datetime | None = None) -> str:
    """A run id that sorts by start time (to the millisecond, UTC) and is unique across machines:
    ``20260102T030405.678Z-1a2b3c``."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


class VerdictLog:
    """Appends one JSON object per line to a file (or stdout for ``-``).

    Each line goes to the file at once (unbuffered, ``O_APPEND``), so after Ctrl-C (which
    ``ism-edge run`` turns into a graceful stop) or a crash every finished frame is on disk. A
    write that fails part-way (disk full, file-size limit) is rolled back to the last whole line
    and raises :class:`OutputError`; ``lines`` counts the records written (not the header). If an earlier run died
    mid-line, a newline is added first so the old partial line cannot merge with a new one.

    Since the log is appended, several runs can share a file: with a ``run_id`` every line starts
    with ``"run": run_id``, and :meth:`write_header` writes the run's ``"event": "start"`` line
    (docs/runtime.md, "The verdict log").
    """

    kind = "log"

    def __init__(self, path: str | os.PathLike[str], run_id: str | None = None) -> None:
        self.path = str(path)
        self.run_id = run_id
        self.lines = 0
        self.failed = False
        self._fd: int | None = None
        self._stdout: IO[str] | None = None
        if self.path == "-":
            self._stdout = sys.stdout
            return
        p = Path(self.path)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            needs_newline = p.is_file() and p.stat().st_size > 0 and _last_byte(p) != b"\n"
            self._fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputError(
                f"verdict log {p} cannot be opened for appending ({e.strerror}): check the path and permissions"
            ) from None
        if needs_newline:
            self._append(b"\n")

    def write_header(self, fields: dict[str, Any]) -> None:
        """Append the run's header line: ``{"run": ID, "event": "start", **fields}`` (no ``frame`` key,
        which tells it from a verdict); it does not count in ``lines``."""
        self.write({"event": "start", **fields})
        self.lines -= 1

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line; raises :class:`OutputError` (nothing of it kept) if it cannot be."""
        if self.run_id is not None:
            record = {"run": self.run_id, **record}
        line = json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"
        if self._stdout is not None:
            try:
                self._stdout.write(line)
                self._stdout.flush()
            except OSError as e:
                self.failed = True
                raise OutputError(
                    f"the verdict log (stdout) cannot be written ({e.strerror or e}) after {self.lines} lines"
                ) from None
        else:
            self._append(line.encode())
        self.lines += 1

    def _append(self, data: bytes) -> None:
        assert self._fd is not None
        start = os.fstat(self._fd).st_size
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                if n <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[n:]
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)  # no cut line is left behind
            self.failed = True
            raise OutputError(
                f"verdict log {self.path} cannot be written ({e.strerror or e}) after {self.lines} lines: "
                "check free disk space (and the file-size limit, ulimit -f); every line in it is whole"
            ) from None

    def close(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EROFS, errno.ENOTSUP):  # not a regular file (a pipe, /dev/null)
                self.failed = True
                raise OutputError(
                    f"verdict log {self.path} cannot be saved ({e.strerror or e}): check free disk space"
                ) from None
        finally:
            os.close(fd)


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


class FrameSink:
    """Somewhere annotated frames go. ``stop_requested`` lets a window end the run.

    File sinks have a ``path``; ``frames`` counts the frames in them (after :meth:`close`: the
    frames a reader finds there) and ``failed`` says that a write failed.
    """

    kind = "display"
    path: Path | None = None
    frames = 0
    failed = False
    stop_requested = False

    def write(self, image: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        return None


class VideoFileOutput(FrameSink):
    """An annotated video file, written to a temporary sibling and renamed on :meth:`close`.

    The encoder is chosen when the output is opened (:func:`ism_edge.encoders.choose_encoder`:
    H.264 for MP4 where possible); ``note`` is set when an MP4 falls back to MPEG-4 Part 2. The frame
    size is fixed by the first frame (cut to even sides for H.264); later frames of another size (an
    image folder) are resized to it. A frame the encoder reports it could not write raises
    :class:`OutputError`. :meth:`close` reopens the finished file and renames it into place only
    if every frame can be read back; otherwise it raises :class:`OutputError`, and the frames that
    can be read (if any) are kept as ``NAME.partial.EXT`` (never over an existing file).
    """

    kind = "video"
    path: Path

    def __init__(self, path: str | os.PathLike[str], fps: float = 30.0) -> None:
        self.path = Path(path)
        self.fps = float(fps) if fps and fps > 0 else 30.0
        self.frames = 0
        self.failed = False
        suffix = self.path.suffix.lower()
        if suffix not in VIDEO_CODECS:
            raise OutputError(f"output {self.path}: unsupported video extension {suffix!r} ({', '.join(VIDEO_CODECS)})")
        self.encoder: Encoder
        self.encoder, note = choose_encoder(suffix)
        self.note = None if note is None else note.format(path=self.path)
        self._writer: VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        self._tmp: Path | None = None

    def _open(self, width: int, height: int) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".partial{self.path.suffix}",
                                       dir=self.path.parent)
            os.close(fd)
        except OSError as e:
            raise OutputError(
                f"output {self.path} cannot be created ({e.strerror}): check the folder and permissions"
            ) from None
        self._tmp = Path(tmp)
        size = even_size(width, height) if self.encoder.even_size else (width, height)
        try:
            writer = self.encoder.open(self._tmp, self.fps, size)
        except Exception as e:  # noqa: BLE001 - any encoder failure is this one-line error
            self._tmp.unlink(missing_ok=True)
            raise OutputError(f"output {self.path}: {self.encoder.name} cannot write {self.encoder.codec} video "
                              f"here ({e}): try an .avi output") from None
        self._writer = writer
        self._size = size

    def write(self, image: np.ndarray) -> None:
        if self.failed:
            raise OutputError(f"annotated video {self.path}: an earlier frame could not be written")
        h, w = image.shape[:2]
        if self._writer is None:
            self._open(w, h)
        assert self._size is not None and self._writer is not None
        if (w, h) != self._size:
            sw, sh = self._size
            if 0 <= w - sw <= 1 and 0 <= h - sh <= 1:  # an odd side cut to even for H.264: crop, not resample
                image = image[:sh, :sw]
            else:
                image = cv2.resize(image, self._size, interpolation=cv2.INTER_AREA)
        if not self._writer.write(np.ascontiguousarray(image)):
            self.failed = True
            raise OutputError(
                f"annotated video {self.path}: frame {self.frames} cannot be written: "
                "check free disk space (and the file-size limit, ulimit -f)"
            )
        self.frames += 1

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.release()
        self._writer = None
        assert self._tmp is not None
        tmp, self._tmp = self._tmp, None
        written = self.frames
        if not written:
            tmp.unlink(missing_ok=True)
            return
        readable = _readable_frames(tmp, written, exact=self.failed)
        if readable >= written and not self.failed:
            _public_mode(tmp)  # mkstemp made it 0600; give it the mode open() would
            os.replace(tmp, self.path)
            return
        self.failed = True
        self.frames = readable
        fix = "check free disk space (and the file-size limit, ulimit -f)"
        if not readable:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"annotated video {self.path} could not be written: none of its {written} frames can be "
                              f"read back, so nothing was kept: {fix}")
        partial = self.path.with_name(f"{self.path.stem}.partial{self.path.suffix}")
        _public_mode(tmp)
        if not partial.exists():
            os.replace(tmp, partial)
        else:
            partial = tmp
        raise OutputError(f"annotated video {self.path} is incomplete: the {readable} frames that can be read back "
                          f"were kept in {partial}: {fix}")


def _readable_frames(path: Path, expected: int, *, exact: bool) -> int:
    """How many frames of a video file a reader finds: the container's count when the file is whole
    (``exact=False``: cheap), else by reading (at most ``expected``)."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            return 0
        if not exact:
            count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            if count >= expected:
                return count
        n = 0
        while n < expected and cap.grab():
            n += 1
        return n
    finally:
        cap.release()


class ImageFolderOutput(FrameSink):
    """Numbered JPEG images in a folder (``frame_000000.jpg``, …), each written atomically."""

    kind = "images"

    def __init__(self, folder: str | os.PathLike[str], pattern: str = IMAGE_PATTERN) -> None:
        self.folder = self.path = Path(folder)
        self.pattern = pattern
        self.frames = 0
        self.failed = False
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"output folder {self.folder} cannot be created ({e.strerror}): check the path") from None

    def write(self, image: np.ndarray) -> None:
        name = self.folder / self.pattern.format(self.frames)
        tmp = name.with_name(f".{name.stem}.partial{name.suffix}")
        try:
            if not cv2.imwrite(str(tmp), image):
                raise OSError("OpenCV could not write it")
            os.replace(tmp, name)
        except (OSError, cv2.error):
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self.failed = True
            raise OutputError(f"image {name} cannot be written: check free disk space and permissions") from None
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
            raise OutputError(f"display://0: cannot open a window ({str(e).strip().splitlines()[-1]}): "
                              "is DISPLAY set? or pass --headless") from None
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
