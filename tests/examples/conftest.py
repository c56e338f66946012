"""Fixtures for the examples' tests: the ROS 2 package on sys.path, and a real engine directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.examples.fake_ros import ROS2_PACKAGE
from tests.ism_edge.conftest import shared_engine_dir

# The ament_python package's source, importable without colcon.
if str(ROS2_PACKAGE) not in sys.path:
    sys.path.insert(0, str(ROS2_PACKAGE))


@pytest.fixture(scope="session")
def engine_dir(untrained_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ONNX Runtime engine directory of the untrained `small` bundle, shared with tests/ism_edge."""
    return shared_engine_dir(untrained_bundle_dir, tmp_path_factory)
