"""Stand-ins for the parts of rclpy and the ROS message packages the defense node uses.

ROS 2 is not installed on the development machine; these fakes mirror the rclpy API the node
calls (keyword-constructed messages, ``DiagnosticStatus`` levels as one-byte ``bytes``,
``Node.declare_parameter(...).value``, publishers with ``publish``), so that ``ism_edge_ros.node``
can be imported and driven here. They check types the way rclpy's generated classes do where
the node could get it wrong (a level that is not ``bytes``, a header that is not a Header).
"""

from __future__ import annotations

import array
import threading
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np

from tests.conftest import ROOT

ROS2_PACKAGE = ROOT / "examples" / "ros2" / "ism_edge_ros"


class Message:
    """A message class: keyword fields, attribute access, unknown fields refused (as rclpy does)."""

    FIELDS: tuple[str, ...] = ()

    def __init__(self, **fields: Any) -> None:
        unknown = set(fields) - set(self.FIELDS)
        assert not unknown, f"{type(self).__name__} has no field(s) {sorted(unknown)}"
        for name in self.FIELDS:
            setattr(self, name, fields.get(name))


class Time(Message):
    FIELDS = ("sec", "nanosec")


class Header(Message):
    FIELDS = ("stamp", "frame_id")


class Image(Message):
    FIELDS = ("header", "height", "width", "encoding", "is_bigendian", "step", "data")


class String(Message):
    FIELDS = ("data",)


class ObjectHypothesis(Message):
    FIELDS = ("class_id", "score")

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        assert isinstance(self.class_id, str) and isinstance(self.score, float)


class Classification(Message):
    FIELDS = ("header", "results")

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        assert isinstance(self.header, Header)


class KeyValue(Message):
    FIELDS = ("key", "value")

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        assert isinstance(self.key, str) and isinstance(self.value, str)


class DiagnosticStatus(Message):
    FIELDS = ("level", "name", "message", "hardware_id", "values")
    OK, WARN, ERROR, STALE = b"\x00", b"\x01", b"\x02", b"\x03"

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        assert isinstance(self.level, bytes) and len(self.level) == 1, (
            "level is a byte field: use DiagnosticStatus.OK etc.")


class DiagnosticArray(Message):
    FIELDS = ("header", "status")


def image_msg(
    frame_bgr: np.ndarray, *, encoding: str = "bgr8", pad: int = 0, stamp: tuple[int, int] = (1700000000, 250),
    frame_id: str = "camera_optical_frame",
) -> Image:
    """A ``sensor_msgs/Image`` of ``frame_bgr`` as a driver fills it: ``rgb8`` reorders the
    channels, ``pad`` bytes of 0xAB end every row (``step = 3 × width + pad``), ``data`` is an
    ``array.array('B')`` like rclpy's."""
    h, w, _ = frame_bgr.shape
    pixels = frame_bgr[:, :, ::-1] if encoding == "rgb8" else frame_bgr
    rows = np.full((h, 3 * w + pad), 0xAB, dtype=np.uint8)
    rows[:, : 3 * w] = pixels.reshape(h, 3 * w)
    return Image(
        header=Header(stamp=Time(sec=stamp[0], nanosec=stamp[1]), frame_id=frame_id),
        height=h, width=w, encoding=encoding, is_bigendian=0, step=3 * w + pad, data=array.array("B", rows.tobytes()),
    )


class Publisher:
    def __init__(self, msg_type: type, topic: str, qos: Any) -> None:
        self.msg_type, self.topic, self.qos = msg_type, topic, qos
        self.published: list[Any] = []
        self.event = threading.Event()

    def publish(self, msg: Any) -> None:
        assert isinstance(msg, self.msg_type), (
            f"{self.topic}: published a {type(msg).__name__}, not a {self.msg_type.__name__}")
        self.published.append(msg)
        self.event.set()


class Logger:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def _log(self, level: str, message: str) -> None:
        self.lines.append((level, message))

    def info(self, message: str) -> None:
        self._log("info", message)

    def warning(self, message: str) -> None:
        self._log("warning", message)

    def error(self, message: str) -> None:
        self._log("error", message)

    def fatal(self, message: str) -> None:
        self._log("fatal", message)

    def at(self, level: str) -> list[str]:
        return [m for lv, m in self.lines if lv == level]


SENSOR_DATA_QOS = SimpleNamespace(name="qos_profile_sensor_data", reliability="best_effort", depth=5)
LOGGERS: dict[str, Logger] = {}


class Node:
    """``rclpy.node.Node`` as far as the defense node uses it; ``parameter_overrides`` is a dict,
    ``command_line`` the parameters given as ``--ros-args -p name:=value``."""

    command_line: dict[str, Any] = {}

    def __init__(self, node_name: str, *, parameter_overrides: dict[str, Any] | None = None) -> None:
        self._name = node_name
        self.overrides = {**self.command_line, **(parameter_overrides or {})}
        self.declared: dict[str, Any] = {}
        self.publishers: dict[str, Publisher] = {}
        self.subscriptions: list[tuple[type, str, Any, Any]] = []
        self.timers: list[tuple[float, Any]] = []
        self.logger = LOGGERS.setdefault(node_name, Logger())
        self.destroyed = False

    def declare_parameter(self, name: str, value: Any) -> SimpleNamespace:
        assert name not in self.declared, f"parameter {name} declared twice"
        got = self.overrides.get(name, value)
        assert type(got) is type(value), f"parameter {name}: {got!r} is not of the declared type {type(value).__name__}"
        self.declared[name] = got
        return SimpleNamespace(value=got)

    def create_publisher(self, msg_type: type, topic: str, qos: Any) -> Publisher:
        self.publishers[topic] = Publisher(msg_type, topic, qos)
        return self.publishers[topic]

    def create_subscription(self, msg_type: type, topic: str, callback: Any, qos: Any) -> None:
        self.subscriptions.append((msg_type, topic, callback, qos))

    def create_timer(self, period: float, callback: Any) -> None:
        self.timers.append((period, callback))

    def get_logger(self) -> Logger:
        return self.logger

    def get_name(self) -> str:
        return self._name

    def get_clock(self) -> SimpleNamespace:
        return SimpleNamespace(now=lambda: SimpleNamespace(to_msg=lambda: Time(sec=1700000001, nanosec=0)))

    def destroy_node(self) -> None:
        self.destroyed = True


def modules() -> dict[str, ModuleType]:
    """``sys.modules`` entries for rclpy and the message packages, backed by the fakes above."""

    def module(name: str, **attrs: Any) -> ModuleType:
        m = ModuleType(name)
        m.__dict__.update(attrs)
        return m

    state = SimpleNamespace(initialised=False, spun=[])
    rclpy = module(
        "rclpy",
        init=lambda args=None: setattr(state, "initialised", True),
        ok=lambda: state.initialised,
        shutdown=lambda: setattr(state, "initialised", False),
        spin=lambda node: state.spun.append(node),
        state=state,
    )
    out = {
        "rclpy": rclpy,
        "rclpy.node": module("rclpy.node", Node=Node),
        "rclpy.qos": module("rclpy.qos", qos_profile_sensor_data=SENSOR_DATA_QOS),
        "rclpy.logging": module("rclpy.logging", get_logger=lambda name: LOGGERS.setdefault(name, Logger())),
        "sensor_msgs.msg": module("sensor_msgs.msg", Image=Image),
        "std_msgs.msg": module("std_msgs.msg", Header=Header, String=String),
        "vision_msgs.msg": module("vision_msgs.msg", Classification=Classification, ObjectHypothesis=ObjectHypothesis),
        "diagnostic_msgs.msg": module(
            "diagnostic_msgs.msg", DiagnosticArray=DiagnosticArray, DiagnosticStatus=DiagnosticStatus, KeyValue=KeyValue
        ),
    }
    for name in ("sensor_msgs", "std_msgs", "vision_msgs", "diagnostic_msgs"):
        out[name] = module(name, msg=out[f"{name}.msg"])
    rclpy.node, rclpy.qos, rclpy.logging = out["rclpy.node"], out["rclpy.qos"], out["rclpy.logging"]
    return out


def launch_modules(recorded: type) -> dict[str, ModuleType]:
    """``sys.modules`` entries for the ``launch``/``launch_ros`` names the launch file uses, each
    class replaced by ``recorded`` (which keeps its constructor's arguments)."""
    names = {
        "launch": ["LaunchDescription"],
        "launch.actions": ["DeclareLaunchArgument"],
        "launch.substitutions": ["LaunchConfiguration"],
        "launch_ros.actions": ["Node"],
        "launch_ros.parameter_descriptions": ["ParameterValue"],
    }
    out: dict[str, ModuleType] = {}
    for module_name, classes in names.items():
        out[module_name] = ModuleType(module_name)
        for cls in classes:
            setattr(out[module_name], cls, type(cls, (recorded,), {}))
    out["launch_ros"] = ModuleType("launch_ros")
    return out
