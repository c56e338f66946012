"""The node's ROS parameters: one definition, read by the node and the launch file (no ROS here)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ism_edge.runtime import RuntimeOptions

# name → (default, description). The default's type is the parameter's type.
PARAMETERS: dict[str, tuple[Any, str]] = {
    "engine_dir": ("", "engine directory written by 'ism-edge build' (required)"),
    "image_topic": ("camera/image_raw", "sensor_msgs/Image input, subscribed with the sensor-data QoS (best effort)"),
    "verdict_topic": ("defense/verdict", "std_msgs/String output: one JSON verdict per image"),
    "publish_classification": (True, "also publish vision_msgs/Classification (label and confidence)"),
    "classification_topic": ("defense/classification", "vision_msgs/Classification output"),
    "diagnostics_period": (1.0, "seconds between diagnostic_msgs/DiagnosticArray messages on /diagnostics"),
    "backend": ("auto", "'auto', 'tensorrt' or 'onnxruntime'"),
    "device": ("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    "mode": ("resize", "'resize' (whole frame) or 'tile' (model-size tiles, per-tile scores)"),
    "feedback_rounds": (-1, "feedback reformation rounds; -1: the engine manifest's"),
    "threads": (0, "ONNX Runtime intra-op threads; 0: one per core"),
    "verify": (True, "check the engine files' SHA-256 against the manifest when loading"),
}


def check(values: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the parameter for values the node cannot start with."""
    if not values["engine_dir"]:
        raise ValueError(
            "parameter engine_dir is not set: pass the directory 'ism-edge build' wrote (engine_dir:=/path)"
        )
    if not values["diagnostics_period"] > 0:
        raise ValueError(f"parameter diagnostics_period must be > 0 seconds, got {values['diagnostics_period']}")


def runtime_options(values: dict[str, Any]) -> RuntimeOptions:
    """The :class:`~ism_edge.runtime.RuntimeOptions` of the parameter ``values`` (frames are BGR:
    :func:`ism_edge_ros.core.frame_from_image` turns ``rgb8`` into BGR). Raises ``ValueError`` with
    the allowed values for a bad one."""
    from ism_edge.runtime import RuntimeOptions  # here, so that the launch file loads no runtime

    return RuntimeOptions(
        backend=None if values["backend"] == "auto" else values["backend"],
        device=values["device"],
        mode=values["mode"],
        color_order="BGR",
        feedback_rounds=None if values["feedback_rounds"] < 0 else values["feedback_rounds"],
        threads=values["threads"] or None,
        verify=values["verify"],
    )
