"""``defense_node``: the ism-edge adversarial defense as a ROS 2 node.

Subscribes to ``sensor_msgs/Image`` (``bgr8``/``rgb8``) with the sensor-data QoS, runs
:class:`ism_edge.DefenseRuntime` on the newest image in a worker thread, and publishes one JSON
verdict (``std_msgs/String``) and one ``vision_msgs/Classification`` per image, both carrying the
input's header, plus a ``diagnostic_msgs/DiagnosticArray`` on ``/diagnostics``. The logic lives
in :mod:`ism_edge_ros.core`; this module is the ROS wiring. Parameters: :mod:`ism_edge_ros.parameters`.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import Header, String
from vision_msgs.msg import Classification, ObjectHypothesis

from ism_edge import DefenseRuntime, IsmEdgeError
from ism_edge.errors import ExitCode
from ism_edge_ros.core import DefenseCore, Messages
from ism_edge_ros.parameters import PARAMETERS, check, runtime_options

NODE_NAME = "ism_edge_defense"
MESSAGES = Messages(String, Classification, ObjectHypothesis, DiagnosticArray, DiagnosticStatus, KeyValue)


class DefenseNode(Node):
    """Loads the engines once (and warms them up), then turns images into verdicts."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        values = {name: self.declare_parameter(name, default).value for name, (default, _) in PARAMETERS.items()}
        check(values)
        self.runtime = DefenseRuntime(values["engine_dir"], options=runtime_options(values))
        self.runtime.warmup()
        self.get_logger().info(f"{values['engine_dir']}: {self.runtime.describe()}")
        verdicts = self.create_publisher(String, values["verdict_topic"], 10)
        classifications = (
            self.create_publisher(Classification, values["classification_topic"], 10)
            if values["publish_classification"]
            else None
        )
        self.core = DefenseCore(
            self.runtime,
            MESSAGES,
            publish_verdict=verdicts.publish,
            publish_classification=classifications.publish if classifications is not None else None,
            logger=self.get_logger(),
            name=self.get_name(),
        )
        self._diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # Camera drivers publish best effort; a RELIABLE subscription would never connect to them.
        self.create_subscription(Image, values["image_topic"], self.core.receive, qos_profile_sensor_data)
        self.create_timer(values["diagnostics_period"], self._publish_diagnostics)
        self._worker = threading.Thread(target=self._work, name=f"{NODE_NAME}-worker", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        while not self.core.stopped:
            try:
                self.core.process_next(timeout=0.5)
            except Exception as e:  # a backend failure: report it, keep serving the next image
                self.get_logger().error(f"defense failed on an image: {type(e).__name__}: {e}")

    def _publish_diagnostics(self) -> None:
        self._diagnostics.publish(self.core.diagnostics(Header(stamp=self.get_clock().now().to_msg())))

    def destroy_node(self) -> None:
        self.core.stop()
        self._worker.join(timeout=10.0)
        self.runtime.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    rclpy.init(args=args)
    try:
        node = DefenseNode()
    except (IsmEdgeError, ValueError) as e:  # bad parameter, engine directory, backend: one line
        get_logger(NODE_NAME).fatal(str(e))
        rclpy.shutdown()
        # the exit codes of `ism-edge` (ExitCode): a bad parameter is a usage error, the rest bad input
        sys.exit(e.exit_code if isinstance(e, IsmEdgeError) else ExitCode.USAGE)
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()


if __name__ == "__main__":
    main()
