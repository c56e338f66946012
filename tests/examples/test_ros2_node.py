"""The ROS 2 node (examples/ros2/ism_edge_ros) on a real engine directory, with ROS faked.

ROS 2 is not installed here: the message classes, the publishers and ``rclpy`` itself are the
stand-ins of :mod:`tests.examples.fake_ros`. What runs for real is everything else: the image
conversion, :class:`ism_edge.DefenseRuntime` on an ONNX Runtime engine directory, the published
JSON and classification, the drop counting and the diagnostics. (conftest.py puts the package
source on sys.path.)
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from ism_edge_ros.core import DefenseCore, ImageError, Messages, frame_from_image
from ism_edge_ros.parameters import PARAMETERS, check, runtime_options

from ism_edge import DefenseRuntime
from ism_edge.errors import ExitCode, FrameError
from tests.examples import fake_ros
from tests.ism_edge.conftest import PHOTOS

MESSAGES = Messages(
    fake_ros.String, fake_ros.Classification, fake_ros.ObjectHypothesis,
    fake_ros.DiagnosticArray, fake_ros.DiagnosticStatus, fake_ros.KeyValue,
)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    im = cv2.imread(str(PHOTOS / "skimage_chelsea.jpg"), cv2.IMREAD_COLOR)
    return cv2.resize(im, (90, 60), interpolation=cv2.INTER_AREA)  # odd 3×width: padding matters


@pytest.fixture(scope="module")
def runtime(engine_dir: Path):
    with DefenseRuntime(engine_dir, backend="onnxruntime", device="cpu", threads=1) as rt:
        yield rt


def make_core(runtime, *, classification: bool = True, clock: Clock | None = None):
    verdicts = fake_ros.Publisher(fake_ros.String, "defense/verdict", 10)
    classes = fake_ros.Publisher(fake_ros.Classification, "defense/classification", 10) if classification else None
    logger = fake_ros.Logger()
    core = DefenseCore(
        runtime, MESSAGES, publish_verdict=verdicts.publish,
        publish_classification=classes.publish if classes else None, logger=logger, clock=clock or Clock(),
    )
    return core, verdicts, classes, logger


# -- image conversion --------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["bgr8", "rgb8"])
@pytest.mark.parametrize("pad", [0, 1, 6])
def test_frame_from_image_is_the_bgr_frame_whatever_the_encoding_and_padding(photo, encoding, pad):
    msg = fake_ros.image_msg(photo, encoding=encoding, pad=pad)
    frame = frame_from_image(msg)
    assert frame.shape == photo.shape and frame.dtype == np.uint8
    np.testing.assert_array_equal(frame, photo)


@pytest.mark.parametrize("as_type", [bytes, bytearray, list])
def test_frame_from_image_reads_any_uint8_sequence(photo, as_type):
    msg = fake_ros.image_msg(photo, pad=2)
    msg.data = as_type(msg.data)
    np.testing.assert_array_equal(frame_from_image(msg), photo)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"encoding": "mono8"}, "'mono8' is not supported"),
        ({"encoding": "bgra8"}, "'bgra8' is not supported"),
        ({"encoding": "BGR8"}, "'BGR8' is not supported"),
        ({"step": 3 * 90 - 1}, "less than 3 × width"),
        ({"height": 61}, "needs"),
        ({"width": 0}, "empty"),
    ],
)
def test_frame_from_image_refuses_what_it_cannot_read(photo, change, words):
    msg = fake_ros.image_msg(photo)
    for k, v in change.items():
        setattr(msg, k, v)
    with pytest.raises(ImageError, match=words):
        frame_from_image(msg)


# -- the defense on messages -----------------------------------------------------------------------
def test_verdict_json_and_classification_carry_the_input_header_and_the_runtime_verdict(runtime, photo):
    core, verdicts, classes, logger = make_core(runtime)
    msg = fake_ros.image_msg(photo, encoding="rgb8", pad=2, stamp=(1700000123, 456789), frame_id="cam_left")
    core.receive(msg)
    assert core.process_next(timeout=0)

    expected = runtime.process(photo).to_json()
    (out,) = verdicts.published
    record = json.loads(out.data)
    assert record["header"] == {"stamp": {"sec": 1700000123, "nanosec": 456789}, "frame_id": "cam_left"}
    assert record["frame"] == 0 and record["latency_ms"] >= 0
    for key in ("label", "label_index", "confidence", "flagged", "flagged_by", "scores", "thresholds", "frame_size",
                "mode"):
        assert record[key] == expected[key], key
    assert set(record["timings_ms"]) == set(expected["timings_ms"])

    (cls,) = classes.published
    assert cls.header.stamp.sec == 1700000123 and cls.header.stamp.nanosec == 456789
    assert cls.header.frame_id == "cam_left"
    (hyp,) = cls.results
    assert hyp.class_id == expected["label"] and hyp.score == pytest.approx(expected["confidence"], abs=1e-6)
    assert logger.lines == []


def test_classification_can_be_switched_off(runtime, photo):
    core, verdicts, _, _ = make_core(runtime, classification=False)
    core.receive(fake_ros.image_msg(photo))
    assert core.process_next(timeout=0)
    assert len(verdicts.published) == 1


def test_unsupported_encodings_are_counted_and_logged_once_each(runtime, photo):
    core, verdicts, _, logger = make_core(runtime)
    for encoding in ("mono8", "mono8", "bgra8", "mono8", "bgr8"):
        msg = fake_ros.image_msg(photo)
        msg.encoding = encoding
        core.receive(msg)
        core.process_next(timeout=0)
    errors = logger.at("error")
    assert len(errors) == 2 and "'mono8'" in errors[0] and "'bgra8'" in errors[1]
    assert core.counters.rejected == 4 and core.counters.processed == 1 and len(verdicts.published) == 1


def test_a_frame_the_runtime_refuses_is_rejected_and_the_node_goes_on(photo):
    class Refusing:
        def process(self, frame):
            raise FrameError("frame has shape (1, 1, 3): too small")

    core, verdicts, _, logger = make_core(Refusing())
    for _ in range(2):
        core.receive(fake_ros.image_msg(photo))
        core.process_next(timeout=0)
    assert core.counters.rejected == 2 and verdicts.published == []
    assert len(logger.at("error")) == 1 and "too small" in logger.at("error")[0]


def test_images_waiting_behind_a_newer_one_are_dropped_and_the_newest_is_processed(runtime, photo):
    core, verdicts, _, _ = make_core(runtime)
    for i in range(3):
        core.receive(fake_ros.image_msg(photo, frame_id=f"f{i}"))
    assert core.process_next(timeout=0)
    assert not core.process_next(timeout=0)  # nothing left
    assert (core.counters.received, core.counters.dropped, core.counters.processed) == (3, 2, 1)
    assert json.loads(verdicts.published[0].data)["header"]["frame_id"] == "f2"


def test_a_worker_thread_serves_the_subscription_and_stops(runtime, photo):
    core, verdicts, _, _ = make_core(runtime)

    def serve() -> None:  # the node's worker loop
        while not core.stopped:
            core.process_next(timeout=0.05)

    worker = threading.Thread(target=serve)
    worker.start()
    core.receive(fake_ros.image_msg(photo))
    assert verdicts.event.wait(30)
    core.stop()
    worker.join(5)
    assert not worker.is_alive() and core.counters.processed == 1


def test_diagnostics_report_counts_latency_and_warn_on_silence_and_rejections(runtime, photo):
    clock = Clock()
    core, _, _, _ = make_core(runtime, clock=clock)
    header = fake_ros.Header(stamp=fake_ros.Time(sec=5, nanosec=0), frame_id="")
    for i in range(2):
        core.receive(fake_ros.image_msg(photo, frame_id=str(i)))
        clock.now += 0.010  # 10 ms from receipt to verdict
        core.process_next(timeout=0)
    clock.now += 1.0
    arr = core.diagnostics(header)
    assert arr.header is header
    (status,) = arr.status
    values = {kv.key: kv.value for kv in status.values}
    assert status.level == fake_ros.DiagnosticStatus.OK and status.name == "ism_edge_defense: adversarial defense"
    assert values["frames_in"] == "2" and values["processed"] == "2" and values["dropped"] == "0"
    assert values["flagged"] == str(core.counters.flagged) and values["rejected"] == "0"
    assert float(values["latency_ms_p50"]) == pytest.approx(10.0, abs=0.01)
    assert values["engine_dir"] == str(runtime.directory) and "onnxruntime" in status.hardware_id

    clock.now += 1.0
    (silent,) = core.diagnostics(header).status
    assert silent.level == fake_ros.DiagnosticStatus.WARN and "no images" in silent.message

    bad = fake_ros.image_msg(photo)
    bad.encoding = "yuv422"
    core.receive(bad)
    core.process_next(timeout=0)
    (rejecting,) = core.diagnostics(header).status
    assert rejecting.level == fake_ros.DiagnosticStatus.WARN and "rejected" in rejecting.message


# -- parameters ----------------------------------------------------------------------------------------
def test_parameter_defaults_map_to_the_runtime_defaults():
    values = {name: default for name, (default, _) in PARAMETERS.items()}
    with pytest.raises(ValueError, match="engine_dir is not set"):
        check(values)
    values["engine_dir"] = "/engines"
    check(values)
    opts = runtime_options(values)
    assert ((opts.backend, opts.device, opts.feedback_rounds, opts.threads, opts.color_order)
            == (None, "auto", None, None, "BGR"))
    with pytest.raises(ValueError, match="diagnostics_period"):
        check({**values, "diagnostics_period": 0.0})
    with pytest.raises(ValueError, match="backend must be"):
        runtime_options({**values, "backend": "tflite"})


# -- the node module, on fake rclpy --------------------------------------------------------------------
@pytest.fixture
def node_module(monkeypatch):
    for name, module in fake_ros.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "ism_edge_ros.node", raising=False)
    fake_ros.LOGGERS.clear()
    module = importlib.import_module("ism_edge_ros.node")
    yield module
    sys.modules.pop("ism_edge_ros.node", None)


def test_node_wires_sensor_qos_topics_and_parameters_and_publishes(node_module, engine_dir, photo):
    node = node_module.DefenseNode(
        parameter_overrides={"engine_dir": str(engine_dir), "image_topic": "/front/image_raw", "device": "cpu",
                             "threads": 1}
    )
    try:
        assert set(node.declared) == set(PARAMETERS)
        ((msg_type, topic, callback, qos),) = node.subscriptions
        assert msg_type is fake_ros.Image and topic == "/front/image_raw" and qos is fake_ros.SENSOR_DATA_QOS
        assert set(node.publishers) == {"defense/verdict", "defense/classification", "/diagnostics"}
        ((period, tick),) = node.timers
        assert period == 1.0

        callback(fake_ros.image_msg(photo, frame_id="front"))
        assert node.publishers["defense/verdict"].event.wait(30)
        assert json.loads(node.publishers["defense/verdict"].published[0].data)["header"]["frame_id"] == "front"
        tick()
        (diag,) = node.publishers["/diagnostics"].published
        assert diag.header.stamp.sec == 1700000001 and diag.status[0].level == fake_ros.DiagnosticStatus.OK
    finally:
        node.destroy_node()
    assert node.destroyed and not node._worker.is_alive()


@pytest.mark.parametrize(("engine_dir", "words", "code"), [(None, "engine_dir is not set", ExitCode.USAGE),
                                                         ("missing", "missing", ExitCode.BAD_INPUT)])
def test_node_main_exits_with_one_line_for_a_bad_engine_dir(node_module, tmp_path, monkeypatch, engine_dir, words,
                                                            code):
    if engine_dir is not None:  # as `ros2 run ism_edge_ros defense_node --ros-args -p engine_dir:=...`
        monkeypatch.setattr(fake_ros.Node, "command_line", {"engine_dir": str(tmp_path / engine_dir)})
    with pytest.raises(SystemExit) as exit_info:
        node_module.main()
    assert exit_info.value.code == code
    (line,) = fake_ros.LOGGERS["ism_edge_defense"].at("fatal")
    assert words in line and "\n" not in line
    assert not sys.modules["rclpy"].ok()


def test_launch_file_declares_every_parameter_and_requires_engine_dir(monkeypatch):
    class Recorded:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    for name, module in fake_ros.launch_modules(Recorded).items():
        monkeypatch.setitem(sys.modules, name, module)
    path = fake_ros.ROS2_PACKAGE / "launch" / "defense.launch.py"
    spec = importlib.util.spec_from_file_location("defense_launch", path)
    launch_file = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_file)

    description = launch_file.generate_launch_description()
    *arguments, node = description.args[0]
    assert [a.args[0] for a in arguments] == list(PARAMETERS)
    defaults = {a.args[0]: a.kwargs.get("default_value") for a in arguments}
    assert defaults["engine_dir"] is None and defaults["verify"] == "True" and defaults["threads"] == "0"
    assert node.kwargs["package"] == "ism_edge_ros" and node.kwargs["executable"] == "defense_node"
    (parameters,) = node.kwargs["parameters"]
    assert set(parameters) == set(PARAMETERS)
    assert all(v.kwargs["value_type"] is type(PARAMETERS[k][0]) and v.args[0].args == (k,)
               for k, v in parameters.items())
