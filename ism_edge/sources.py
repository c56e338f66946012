"""Frame sources: URI parsing (jetson-utils conventions), a reader thread, drop-oldest queue.

Inputs, as in jetson-utils' ``videoSource``:

==============================  =============================================================
``--camera N`` / ``N``          local camera N (OpenCV, V4L2 on Linux)
``v4l2:///dev/video0``          a V4L2 device (``/dev/video0`` alone works too)
``csi://0``                     a MIPI CSI camera on a Jetson, through a GStreamer pipeline
                                (``nvarguscamerasrc``); needs OpenCV built with GStreamer
``rtsp://…`` ``http(s)://…``    a network stream (OpenCV's FFmpeg backend)
``file://video.mp4``            a video file (a plain path works too)
``file://folder`` / ``folder``  a folder of images, read in name order
==============================  =============================================================

Live sources (cameras, streams) go through a bounded queue that drops the *oldest* frame when
full, so latency never grows; the drops are counted. Files and folders are read without drops
(the reader waits for the consumer). A live source that stops delivering — its connection
closed, or a network stream silent for its read timeout (``read_timeout``, give it the stall
timeout) — is reopened with exponential backoff; when every attempt fails, or when a read never
returns (no frame within the stall timeout, and none in a second one granted to reconnect), the
consumer gets a one-line :class:`~ism_edge.errors.SourceError`.
"""

from __future__ import annotations

import abc
import collections
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import cv2
import numpy as np

from ism_edge.errors import SourceError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "rtp")
SCHEMES = ("camera", "v4l2", "csi", "file", *NETWORK_SCHEMES)
READ_TIMEOUT = 10.0  # s a network read waits for data before the stream counts as lost (ReaderOptions' stall timeout)
OPEN_TIMEOUT = 10.0  # s at least that opening a network stream may take

T = TypeVar("T")


# -- URIs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceURI:
    """A parsed input URI. ``kind`` is ``camera``, ``v4l2``, ``csi``, ``network``, ``video``,
    ``folder`` or ``image``; ``location`` the index, device, URL or path."""

    kind: str
    location: str
    text: str

    @property
    def live(self) -> bool:
        """Cameras and network streams: frames are dropped rather than queued."""
        return self.kind in ("camera", "v4l2", "csi", "network")

    @property
    def path(self) -> Path | None:
        """The file, folder or device this source reads (``video``, ``image``, ``folder``, ``v4l2``), else None."""
        return Path(self.location) if self.kind in ("video", "image", "folder", "v4l2") else None

    def __str__(self) -> str:
        return self.text


def parse_source(text: str | int) -> SourceURI:
    """Parse an input URI (see the module docstring); raises :class:`SourceError` if unsupported."""
    raw = str(text).strip()
    if not raw:
        raise SourceError("no input given: pass a video file, an image folder, a URI such as rtsp://… or --camera N")
    if raw.isdigit():
        return SourceURI("camera", raw, f"camera {raw}")
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", raw)
    if match is None:
        if raw.startswith("/dev/video"):
            return SourceURI("v4l2", raw, raw)
        return _file_uri(raw, raw)
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "v4l2":
        return SourceURI("v4l2", rest if rest.startswith("/") else f"/dev/{rest}", raw)
    if scheme == "csi":
        if not rest.isdigit():
            raise SourceError(f"{raw}: a CSI camera is named by its sensor index, e.g. csi://0")
        return SourceURI("csi", rest, raw)
    if scheme == "camera":
        if not rest.isdigit():
            raise SourceError(f"{raw}: a camera is named by its index, e.g. camera://0 or --camera 0")
        return SourceURI("camera", rest, raw)
    if scheme in NETWORK_SCHEMES:
        return SourceURI("network", raw, redact_credentials(raw))
    if scheme == "file":
        return _file_uri(rest, raw)
    raise SourceError(
        f"input {raw!r} has an unsupported scheme {scheme!r}: use a file path, file://, v4l2://, csi://, "
        "rtsp://, http:// or --camera N"
    )


def redact_credentials(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@``: how a stream is named in logs,
    summaries and error lines (the password of an IP camera must not land in a verdict log)."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*@)(.*)$", url)
    return url if match is None else f"{match.group(1)}***@{match.group(3)}"


def _file_uri(path: str, text: str) -> SourceURI:
    p = Path(os.path.expanduser(path))
    if p.is_dir():
        return SourceURI("folder", str(p), text)
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        return SourceURI("image", str(p), text)
    return SourceURI("video", str(p), text)


# -- sources ------------------------------------------------------------------------------------


class FrameSource(abc.ABC):
    """One opened input; :meth:`read` returns the next BGR ``H×W×3`` uint8 frame or ``None``.

    ``None`` means the end of a file or folder, or a lost live source (the reader then
    reconnects). ``name`` is the file the last frame came from (image folders), else ``None``.
    ``skipped`` counts unreadable items that were passed over; :meth:`take_skips` says which.
    """

    def __init__(self, uri: SourceURI) -> None:
        self.uri = uri
        self.skipped = 0
        self.name: str | None = None
        self._skips: list[tuple[str, str]] = []

    def _skip(self, name: str, reason: str) -> None:
        self.skipped += 1
        self._skips.append((name, reason))

    def take_skips(self) -> list[tuple[str, str]]:
        """(name, reason) of each item passed over since the last call, in order."""
        skips, self._skips = self._skips, []
        return skips

    @property
    def live(self) -> bool:
        return self.uri.live

    @property
    def finite(self) -> bool:
        """Whether ``None`` from :meth:`read` is the definite end (a file, a folder) rather than
        a lost live source to reconnect; a file paced like a camera is live *and* finite."""
        return not self.live

    @property
    def fps(self) -> float | None:
        """Frames per second the source reports, if any."""
        return None

    @abc.abstractmethod
    def open(self) -> None:
        """Open (or reopen) the source; raise :class:`SourceError` with a one-line fix if it fails."""

    @abc.abstractmethod
    def read(self) -> np.ndarray | None: ...

    def close(self) -> None:
        return None


def csi_pipeline(sensor: int, width: int = 1280, height: int = 720, fps: int = 30) -> str:
    """The GStreamer pipeline for a Jetson CSI camera (nvarguscamerasrc → BGR appsink)."""
    return (
        f"nvarguscamerasrc sensor-id={sensor} ! video/x-raw(memory:NVMM), width={width}, height={height}, "
        f"framerate={fps}/1, format=NV12 ! nvvidconv ! video/x-raw, format=BGRx ! videoconvert ! "
        "video/x-raw, format=BGR ! appsink drop=true max-buffers=1"
    )


def opencv_has_gstreamer() -> bool:
    info = cv2.getBuildInformation()
    match = re.search(r"GStreamer:\s*(\S+)", info)
    return bool(match and match.group(1).upper() == "YES")


class CaptureSource(FrameSource):
    """Cameras, streams and video files through ``cv2.VideoCapture``.

    ``read_timeout``: seconds a network stream's read waits for data before it gives up and
    :meth:`read` returns ``None`` (a lost source, which the reader reopens); a stalled stream
    would otherwise block the read for FFmpeg's 30 s. Opening may take at least
    :data:`OPEN_TIMEOUT`. Fixed when the stream is opened (OpenCV takes it only then).
    """

    def __init__(
        self, uri: SourceURI, *, capture: Callable[..., Any] | None = None, read_timeout: float = READ_TIMEOUT
    ) -> None:
        super().__init__(uri)
        if read_timeout <= 0:
            raise ValueError(f"read_timeout must be > 0 seconds, got {read_timeout}")
        self.read_timeout = read_timeout
        self._factory = capture or cv2.VideoCapture
        self._cap: Any = None
        self._fps: float | None = None

    @property
    def fps(self) -> float | None:
        return self._fps

    def _args(self) -> tuple[Any, ...]:
        kind, loc = self.uri.kind, self.uri.location
        if kind == "camera":
            return (int(loc),)
        if kind == "v4l2":
            return (loc, cv2.CAP_V4L2)
        if kind == "csi":
            if not opencv_has_gstreamer():
                raise SourceError(
                    f"{self.uri}: CSI cameras need OpenCV built with GStreamer, and this OpenCV has none: "
                    "install JetPack's OpenCV (python3-opencv) or use v4l2:///dev/videoN"
                )
            return (csi_pipeline(int(loc)), cv2.CAP_GSTREAMER)
        if kind == "network":
            open_ms, read_ms = int(1e3 * max(self.read_timeout, OPEN_TIMEOUT)), max(int(1e3 * self.read_timeout), 1)
            return (
                loc, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, open_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, read_ms]
            )
        return (loc,)

    def open(self) -> None:
        self.close()
        if self.uri.kind == "video" and not Path(self.uri.location).is_file():
            raise SourceError(f"video file {self.uri.location} does not exist: check the path")
        cap = self._factory(*self._args())
        if cap is None or not cap.isOpened():
            raise SourceError(self._open_failure())
        self._cap = cap
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self._fps = fps if 0.0 < fps < 1000.0 else None

    def _open_failure(self) -> str:
        kind, loc = self.uri.kind, self.uri.location
        if kind == "camera":
            return (f"camera {loc} could not be opened: "
                    "check it is connected and not used by another program (ls /dev/video*)")
        if kind == "v4l2":
            return (f"{self.uri}: V4L2 device {loc} could not be opened: "
                    "check it exists (ls /dev/video*) and you may read it (group 'video')")
        if kind == "csi":
            return (f"{self.uri}: the CSI camera could not be opened: "
                    "check the ribbon cable and that nvargus-daemon is running")
        if kind == "network":
            return f"stream {self.uri} could not be opened: check the URL, credentials and network"
        return (f"video file {loc} could not be opened: "
                "it is not a video OpenCV can decode (corrupt or unsupported codec)")

    def read(self) -> np.ndarray | None:
        if self._cap is None:
            return None
        ok, frame = self._cap.read()
        if not ok or frame is None:
            return None
        return np.asarray(frame)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class ImageFolderSource(FrameSource):
    """Images of a folder (or one image), in name order; unreadable files are counted and skipped."""

    def __init__(self, uri: SourceURI) -> None:
        super().__init__(uri)
        self._files: list[Path] = []
        self._next = 0

    def open(self) -> None:
        path = Path(self.uri.location)
        if self.uri.kind == "image":
            if not path.is_file():
                raise SourceError(f"image {path} does not exist: check the path")
            self._files = [path]
        else:
            if not path.is_dir():
                raise SourceError(f"folder {path} does not exist: check the path")
            self._files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not self._files:
                raise SourceError(f"folder {path} has no images ({', '.join(IMAGE_EXTENSIONS)}): check the path")
        self._next = 0

    def read(self) -> np.ndarray | None:
        while self._next < len(self._files):
            path = self._files[self._next]
            self._next += 1
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is not None:
                self.name = path.name
                return np.asarray(image)
            self._skip(path.name, f"{path.name} cannot be read as an image (empty, truncated or not {path.suffix[1:]})")
        return None


def make_source(uri: SourceURI | str | int, **kwargs: Any) -> FrameSource:
    """The source for ``uri``, not opened yet (a multi-stream run opens, and retries, each on its own)."""
    parsed = uri if isinstance(uri, SourceURI) else parse_source(uri)
    if parsed.kind in ("folder", "image"):
        return ImageFolderSource(parsed)
    return CaptureSource(parsed, **kwargs)


def open_source(uri: SourceURI | str | int, **kwargs: Any) -> FrameSource:
    """Build and open the source for ``uri``; raises a one-line :class:`SourceError` on failure."""
    source = make_source(uri, **kwargs)
    source.open()
    return source


class PacedSource(FrameSource):
    """A video file played at its frame rate like a camera (``ism-edge run --realtime``, ``bench --camera-rate``).

    Wraps an (opened or not) file source so its frames arrive at ``fps`` and counts as *live*, so
    the reader keeps only the newest frames and counts the ones it drops, as with a camera.

    Frame *i* is released at ``t0 + i / fps`` (``t0``: the first read); a consumer that falls
    behind gets the overdue frames at once and the reader's drop-oldest queue discards what it
    cannot keep. ``fps`` defaults to the file's. With ``loop`` the file restarts at its end, so a
    short clip can feed a long run.
    """

    def __init__(self, inner: FrameSource, fps: float | None = None, *, loop: bool = False) -> None:
        super().__init__(SourceURI("video", inner.uri.location, f"paced:{inner.uri.text}"))
        self.inner = inner
        self._requested_fps = fps
        self.loop = loop
        self._t0: float | None = None
        self._next = 0

    @property
    def live(self) -> bool:
        return True

    @property
    def finite(self) -> bool:
        return not self.loop  # the end of the file ends the run instead of a reconnection

    @property
    def fps(self) -> float | None:
        return self._requested_fps or self.inner.fps

    def open(self) -> None:
        self.inner.open()
        if self.fps is None:
            raise SourceError(f"{self.inner.uri} reports no frame rate: give one (fps=...) to pace it like a camera")
        self._t0 = None
        self._next = 0

    def read(self) -> np.ndarray | None:
        frame = self.inner.read()
        if frame is None and self.loop:
            self.inner.open()
            frame = self.inner.read()
        if frame is None:
            return None
        now = time.perf_counter()
        if self._t0 is None:
            self._t0 = now
        due = self._t0 + self._next / float(self.fps or 1.0)
        self._next += 1
        if due > now:
            time.sleep(due - now)
        return frame

    def close(self) -> None:
        self.inner.close()


# -- the queue ------------------------------------------------------------------------------------


class DropOldestQueue(Generic[T]):
    """A bounded FIFO that never blocks the producer: when full, the oldest item is dropped.

    ``dropped`` counts the items discarded that way. :meth:`put_wait` is the blocking variant
    for sources that must not lose frames (files).
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self.dropped = 0
        self._items: collections.deque[T] = collections.deque()
        self._cond = threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item: T) -> bool:
        """Append ``item``; returns True when the oldest item had to be dropped to make room."""
        with self._cond:
            dropped = len(self._items) >= self.maxsize
            if dropped:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify()
            return dropped

    def put_wait(self, item: T, stop: threading.Event, poll: float = 0.05) -> bool:
        """Append ``item`` once there is room; returns False if ``stop`` was set first."""
        with self._cond:
            while len(self._items) >= self.maxsize:
                if stop.is_set():
                    return False
                self._cond.wait(poll)
            self._items.append(item)
            self._cond.notify()
            return True

    def get(self, timeout: float | None = None) -> T:
        """Remove and return the oldest item; raises :class:`queue.Empty` after ``timeout`` s."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._items), timeout):
                raise queue.Empty
            item = self._items.popleft()
            self._cond.notify()
            return item


# -- the reader thread ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Captured:
    """A frame as read: its index in the stream, the BGR image, when it was read, and the file it
    came from (image folders)."""

    index: int
    image: np.ndarray
    t_capture: float  # time.perf_counter() when read
    wall_time: float  # time.time() when read
    name: str | None = None


@dataclass(frozen=True)
class Skipped:
    """An item of the source that could not be read (an image folder's broken file), in its place."""

    index: int
    name: str
    reason: str
    wall_time: float


@dataclass(frozen=True)
class ReaderOptions:
    """``queue_size`` frames kept (live sources drop the oldest beyond it; ``drop`` overrides
    the per-source default), ``stall_timeout`` seconds without a frame before a source counts as
    stalled (a live one then gets as long again to be reopened), ``reconnect_attempts`` tries to
    reopen a lost live source with delays starting at ``reconnect_delay`` s and doubling up to
    ``reconnect_max_delay`` s."""

    queue_size: int = 2
    drop: bool | None = None
    stall_timeout: float = 10.0
    reconnect_attempts: int = 5
    reconnect_delay: float = 0.5
    reconnect_max_delay: float = 8.0

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")
        if self.stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be > 0 seconds, got {self.stall_timeout}")
        if self.reconnect_attempts < 0:
            raise ValueError(f"reconnect_attempts must be >= 0, got {self.reconnect_attempts}")
        if self.reconnect_delay < 0 or self.reconnect_max_delay < self.reconnect_delay:
            raise ValueError("reconnect delays must satisfy 0 <= reconnect_delay <= reconnect_max_delay")

    def delays(self) -> Iterator[float]:
        """The backoff schedule: reconnect_delay, ×2, … capped at reconnect_max_delay."""
        delay = self.reconnect_delay
        for _ in range(self.reconnect_attempts):
            yield delay
            delay = min(delay * 2.0, self.reconnect_max_delay)


class _End:
    pass


_END = _End()


class FrameReader:
    """Reads a source on a daemon thread into a :class:`DropOldestQueue`; iterate or :meth:`get`.

    The source is opened by the caller (so an unreadable source fails at once, in the caller's
    thread). Use as a context manager; :meth:`stop` ends the thread. ``on_item`` is called (on
    the reader thread) after each item is queued: a consumer of several readers waits on one
    condition instead of polling each queue.
    """

    def __init__(
        self, source: FrameSource, options: ReaderOptions | None = None, *, on_item: Callable[[], None] | None = None
    ) -> None:
        self.source = source
        self._on_item = on_item
        self.options = options or ReaderOptions()
        drop = source.live if self.options.drop is None else self.options.drop
        self.drop = drop
        self.queue: DropOldestQueue[Captured | Skipped | _End | SourceError] = DropOldestQueue(self.options.queue_size)
        self.reconnects = 0
        self.reconnecting = False
        self.frames_read = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ism-edge reader {source.uri}", daemon=True)
        self._finished = False

    @property
    def dropped(self) -> int:
        return self.queue.dropped

    @property
    def skipped(self) -> int:
        return self.source.skipped

    def start(self) -> FrameReader:
        self._thread.start()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """Ask the thread to finish and release the source (if the thread is not stuck in a read)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.source.close()

    def __enter__(self) -> FrameReader:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def finished(self) -> bool:
        """Whether the consumer has seen the end of the source or its final error."""
        return self._finished

    def poll(self) -> Captured | Skipped | None:
        """The next item if one is waiting, else ``None`` at once (see :attr:`finished` for the end).

        Raises :class:`SourceError` when the source is lost for good. Stall detection is the
        caller's (``get`` does it for a single source; ``ism_edge.multi_stream`` for several).
        """
        if self._finished:
            return None
        try:
            item = self.queue.get(timeout=0)
        except queue.Empty:
            return None
        if isinstance(item, _End):
            self._finished = True
            return None
        if isinstance(item, SourceError):
            self._finished = True
            raise item
        return item

    def __iter__(self) -> Iterator[Captured | Skipped]:
        while True:
            item = self.get()
            if item is None:
                return
            yield item

    def get(self, timeout: float | None = None, stop: threading.Event | None = None) -> Captured | Skipped | None:
        """The next frame (or :class:`Skipped` item), or ``None`` at the end of the source (or once ``stop`` is set).

        Raises :class:`SourceError` when a live source is lost for good, or when no frame comes
        within ``timeout`` seconds (default: the stall timeout; the clock restarts while the
        source is being reopened). A live source that may be reopened gets a second ``timeout``
        first: its read gives up after its read timeout and the reader reopens it.
        """
        if self._finished:
            return None
        wait = self.options.stall_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        grace = not self.source.finite and self.options.reconnect_attempts > 0
        reconnects = self.reconnects
        while True:
            remaining = deadline - time.monotonic()
            step = min(remaining, 0.1)
            try:
                item = self.queue.get(timeout=max(step, 0.0))
                break
            except queue.Empty:
                if stop is not None and stop.is_set():
                    return None
                if self.reconnecting or self.reconnects != reconnects:
                    reconnects = self.reconnects
                    deadline = time.monotonic() + wait
                    continue
                if time.monotonic() >= deadline:
                    if grace:  # the read may be about to time out: give the reader the time to reopen the source
                        grace = False
                        deadline = time.monotonic() + wait
                        continue
                    raise SourceError(
                        f"{self.source.uri} delivered no frame for {wait:g} s (stalled): check the camera or stream, "
                        "or raise --stall-timeout"
                    ) from None
        if isinstance(item, _End):
            self._finished = True
            return None
        if isinstance(item, SourceError):
            self._finished = True
            raise item
        return item

    def _emit(self, item: Captured | Skipped | _End | SourceError) -> bool:
        """Queue an item: drop-oldest for live sources, wait for room otherwise."""
        queued = True
        if self.drop:
            self.queue.put(item)
        else:
            queued = self.queue.put_wait(item, self._stop)
        if queued and self._on_item is not None:
            self._on_item()
        return queued

    def _run(self) -> None:
        index = 0
        try:
            while not self._stop.is_set():
                frame = self.source.read()
                for name, reason in self.source.take_skips():
                    if not self._emit(Skipped(index, name, reason, time.time())):
                        return
                    index += 1
                if frame is None:
                    if self.source.finite:
                        self._emit(_END)
                        return
                    if not self._reconnect():
                        return
                    continue
                self.frames_read += 1
                if not self._emit(Captured(index, frame, time.perf_counter(), time.time(), self.source.name)):
                    return
                index += 1
        except Exception as e:  # a decoder crash must reach the consumer as one clear line
            self._emit(SourceError(f"{self.source.uri}: reading failed ({type(e).__name__}: {e}): check the source"))

    def _reconnect(self) -> bool:
        """Reopen a lost live source with exponential backoff.

        Returns True once reopened; False when stopped or when every attempt failed (then the
        consumer gets the error). While this runs the consumer does not time out.
        """
        self.reconnecting = True
        try:
            self.source.close()
            started = time.monotonic()
            attempts = 0
            last = ""
            for delay in self.options.delays():
                if self._stop.wait(delay):
                    return False
                attempts += 1
                try:
                    self.source.open()
                except SourceError as e:
                    last = str(e)
                    continue
                self.reconnects += 1
                return True
            waited = time.monotonic() - started
            detail = f" (last: {last})" if last else ""
            self._emit(
                SourceError(
                    f"{self.source.uri} stopped delivering frames and {attempts} reconnection attempt(s) over "
                    f"{waited:.1f} s failed{detail}: check the cable or network, then run again"
                )
            )
            return False
        finally:
            self.reconnecting = False
