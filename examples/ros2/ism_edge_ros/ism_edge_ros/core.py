"""The ROS-free half of the defense node: image messages → frames → verdicts → messages.

Nothing here imports ROS. The node (:mod:`ism_edge_ros.node`) hands in the message classes
(:class:`Messages`), its publishers (plain callables) and its logger, so the same code runs under
``rclpy`` and in the tests with stand-ins.

Frames flow through a one-slot mailbox: the subscription callback (:meth:`DefenseCore.receive`)
only stores the newest image and returns; a worker (:meth:`DefenseCore.process_next`) runs the
defense on it. An image replaced before the worker took it is counted as *dropped*, so a slow
defense never builds up latency and the drops are visible in the diagnostics.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ism_edge.errors import FrameError

# sensor_msgs/image_encodings names this node accepts, and the colour order of each.
ENCODINGS = {"bgr8": "BGR", "rgb8": "RGB"}
LATENCY_WINDOW = 1000  # verdicts the latency percentiles are computed over

# Names of the diagnostic_msgs/DiagnosticStatus level constants this node reports.
OK, WARN = "OK", "WARN"


class Logger(Protocol):
    def info(self, message: str) -> None: ...
    def warning(self, message: str) -> None: ...
    def error(self, message: str) -> None: ...


class ImageError(ValueError):
    """A ``sensor_msgs/Image`` that cannot be turned into a frame.

    ``key`` groups repeats of the same problem (one unsupported encoding, one bad size), so the
    node logs each problem once instead of once per frame.
    """

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def _byte_view(data: Any) -> np.ndarray:
    """The bytes of an ``uint8[]`` message field (rclpy: ``array.array('B')``; also bytes, lists)."""
    try:
        return np.frombuffer(memoryview(data), dtype=np.uint8)
    except TypeError:  # a plain list of ints
        return np.asarray(data, dtype=np.uint8)


def frame_from_image(msg: Any) -> np.ndarray:
    """An ``H×W×3`` uint8 BGR frame from a ``sensor_msgs/Image`` of encoding ``bgr8`` or ``rgb8``.

    Row padding (``step`` larger than ``3 × width``) is cut off; the frame is a view of the
    message's buffer where possible (no copy). Raises :class:`ImageError` for any other encoding
    and for sizes that do not match the data.
    """
    encoding = str(msg.encoding)
    if encoding not in ENCODINGS:
        raise ImageError(
            f"image encoding {encoding!r} is not supported: publish {' or '.join(ENCODINGS)} "
            "(e.g. set the camera driver's pixel format, or convert with image_proc)",
            key=f"encoding {encoding}",
        )
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    row = 3 * width
    if height < 1 or width < 1:
        raise ImageError(f"image is {width}×{height}: it is empty", key="empty")
    if step < row:
        raise ImageError(
            f"{encoding} image of width {width} has step {step}, less than 3 × width = {row}: "
            "the driver fills sensor_msgs/Image wrongly",
            key=f"step {width}x{height}/{step}",
        )
    data = _byte_view(msg.data)
    if data.size < height * step:
        raise ImageError(
            f"{encoding} image of {width}×{height} with step {step} needs {height * step} bytes of data, "
            f"the message has {data.size}",
            key=f"size {width}x{height}/{step}/{data.size}",
        )
    frame = data[: height * step].reshape(height, step)[:, :row].reshape(height, width, 3)
    return frame[:, :, ::-1] if ENCODINGS[encoding] == "RGB" else frame


def header_json(header: Any) -> dict[str, Any]:
    """A ``std_msgs/Header`` as JSON: ``{"stamp": {"sec", "nanosec"}, "frame_id"}``."""
    return {
        "stamp": {"sec": int(header.stamp.sec), "nanosec": int(header.stamp.nanosec)},
        "frame_id": str(header.frame_id),
    }


def verdict_record(verdict: Any, header: Any, *, frame: int, latency_ms: float) -> dict[str, Any]:
    """The JSON published on the verdict topic: the input's header, the node's frame counter,
    receive-to-publish latency, then every field of :meth:`ism_edge.Verdict.to_json`."""
    return {"header": header_json(header), "frame": frame, "latency_ms": round(latency_ms, 3), **verdict.to_json()}


@dataclass(frozen=True)
class Messages:
    """The ROS message classes the node builds (``std_msgs/String``, ``vision_msgs/Classification``
    and ``ObjectHypothesis``, ``diagnostic_msgs/DiagnosticArray``, ``DiagnosticStatus`` and
    ``KeyValue``), passed in so that this module imports no ROS."""

    String: Any
    Classification: Any
    ObjectHypothesis: Any
    DiagnosticArray: Any
    DiagnosticStatus: Any
    KeyValue: Any


@dataclass
class Counters:
    """What the node has done since it started; ``latencies_ms`` holds the last verdicts' latency."""

    received: int = 0  # images that arrived on the topic
    processed: int = 0  # images that got a verdict
    flagged: int = 0  # verdicts with flagged = true
    dropped: int = 0  # images replaced by a newer one before the defense took them
    rejected: int = 0  # unsupported encoding, malformed message, or a frame the runtime refused
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))


class DefenseCore:
    """Runs a :class:`ism_edge.DefenseRuntime` on ``sensor_msgs/Image`` messages and publishes.

    ``publish_verdict`` receives a ``std_msgs/String`` (the JSON of :func:`verdict_record`);
    ``publish_classification`` (or ``None`` to publish none) a ``vision_msgs/Classification``
    whose header is the input image's and whose one result is the verdict's label and confidence.
    """

    def __init__(
        self,
        runtime: Any,
        messages: Messages,
        *,
        publish_verdict: Callable[[Any], None],
        publish_classification: Callable[[Any], None] | None,
        logger: Logger,
        name: str = "ism_edge_defense",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.messages = messages
        self.publish_verdict = publish_verdict
        self.publish_classification = publish_classification
        self.logger = logger
        self.name = name
        self.clock = clock
        self.counters = Counters()
        self._cond = threading.Condition()
        self._pending: tuple[Any, float] | None = None
        self._stopped = False
        self._logged: set[str] = set()
        self._last_report = (clock(), 0, 0, 0)  # time, received, processed, rejected

    # -- the subscription side -------------------------------------------------------------------
    def receive(self, msg: Any) -> None:
        """Subscription callback: keep ``msg`` as the newest image (an older one waiting is dropped)."""
        with self._cond:
            self.counters.received += 1
            if self._pending is not None:
                self.counters.dropped += 1
            self._pending = (msg, self.clock())
            self._cond.notify()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def stop(self) -> None:
        """Wake the worker and make :meth:`process_next` return ``False`` from now on."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # -- the worker side -------------------------------------------------------------------------
    def process_next(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` s for an image, run the defense on it and publish; ``False`` when
        none came or :meth:`stop` was called."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending is not None or self._stopped, timeout)
            if self._stopped or self._pending is None:
                return False
            msg, received_at = self._pending
            self._pending = None
        self.process(msg, received_at)
        return True

    def process(self, msg: Any, received_at: float) -> None:
        """Convert ``msg``, run the defense, publish the verdict (and classification)."""
        try:
            verdict = self.runtime.process(frame_from_image(msg))
        except ImageError as e:
            self._reject(e.key, str(e))
            return
        except FrameError as e:
            self._reject(f"frame {e}", f"frame refused by the runtime: {e}")
            return
        latency_ms = (self.clock() - received_at) * 1e3
        with self._cond:
            self.counters.processed += 1
            self.counters.flagged += int(verdict.flagged)
            self.counters.latencies_ms.append(latency_ms)
            frame = self.counters.processed - 1
        record = verdict_record(verdict, msg.header, frame=frame, latency_ms=latency_ms)
        self.publish_verdict(self.messages.String(data=json.dumps(record, separators=(",", ":"))))
        if self.publish_classification is not None:
            hypothesis = self.messages.ObjectHypothesis(class_id=verdict.label, score=float(verdict.confidence))
            self.publish_classification(self.messages.Classification(header=msg.header, results=[hypothesis]))

    def _reject(self, key: str, message: str) -> None:
        with self._cond:
            self.counters.rejected += 1
            first = key not in self._logged
            self._logged.add(key)
        if first:
            self.logger.error(f"{message} (skipping such images; logged once)")

    # -- diagnostics -----------------------------------------------------------------------------
    def diagnostic_status(self) -> tuple[str, str, list[tuple[str, str]]]:
        """``(level, message, key-value pairs)`` for the period since the previous call.

        WARN when no image arrived in the period, or when images were rejected in it; OK otherwise.
        A flagged verdict is a finding, not a fault of the node: it is counted, not a WARN.
        """
        now = self.clock()
        with self._cond:
            c = self.counters
            t0, received0, processed0, rejected0 = self._last_report
            self._last_report = (now, c.received, c.processed, c.rejected)
            lat = np.asarray(c.latencies_ms, dtype=np.float64)
            counts = (c.received, c.processed, c.flagged, c.dropped, c.rejected)
        received, processed, flagged, dropped, rejected = counts
        period = max(now - t0, 1e-9)
        if received == received0:
            level, text = WARN, f"no images in the last {period:.1f} s"
        elif rejected > rejected0:
            level, text = WARN, (f"{rejected - rejected0} images rejected in the last {period:.1f} s "
                                 "(see the node's log)")
        else:
            level, text = OK, f"{(processed - processed0) / period:.1f} verdicts/s, {flagged} of {processed} flagged"
        pct = (lambda q: f"{np.percentile(lat, q):.2f}") if lat.size else (lambda q: "")
        values = [
            ("frames_in", str(received)),
            ("processed", str(processed)),
            ("flagged", str(flagged)),
            ("dropped", str(dropped)),
            ("rejected", str(rejected)),
            ("verdicts_per_s", f"{(processed - processed0) / period:.2f}"),
            ("latency_ms_last", f"{lat[-1]:.2f}" if lat.size else ""),
            ("latency_ms_p50", pct(50)),
            ("latency_ms_p99", pct(99)),
            ("runtime", self.runtime.describe()),
            ("engine_dir", str(self.runtime.directory)),
        ]
        return level, text, values

    def diagnostics(self, header: Any) -> Any:
        """A ``diagnostic_msgs/DiagnosticArray`` of one status (see :meth:`diagnostic_status`)."""
        m = self.messages
        level, text, values = self.diagnostic_status()
        status = m.DiagnosticStatus(
            level=getattr(m.DiagnosticStatus, level),
            name=f"{self.name}: adversarial defense",
            message=text,
            hardware_id=self.runtime.backend_name,
            values=[m.KeyValue(key=k, value=v) for k, v in values],
        )
        return m.DiagnosticArray(header=header, status=[status])
