"""Which TensorRT counts (ism_edge/backends/tensorrt/loader.py): a real one, not tensorrt-stubs,
of version 10 or newer — asked the same way by the backend, the builder and the compat check."""

from __future__ import annotations

import sys
import types

import pytest

from ism_edge import compat
from ism_edge.backends.tensorrt import TensorRTBackend, tensorrt_module
from ism_edge.backends.tensorrt.loader import major_version, tensorrt_usable
from ism_edge.errors import MissingDependencyError
from tests.ism_edge import fake_tensorrt as fake


def test_a_tensorrt_older_than_10_is_refused_where_it_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    from ism_edge_engines import tensorrt_build

    monkeypatch.setitem(sys.modules, "tensorrt", fake.tensorrt_module(fake.FakeCudaDriver(), version="8.6.1.6"))
    with pytest.raises(MissingDependencyError,
                       match=r"needs TensorRT 10 or newer.*TensorRT 8\.6\.1\.6 is installed.*--backend onnxruntime"):
        tensorrt_module()
    with pytest.raises(MissingDependencyError, match="building TensorRT engines needs TensorRT 10"):
        tensorrt_build.tensorrt_version()
    assert not tensorrt_usable() and not tensorrt_build.tensorrt_available() and not TensorRTBackend.available()
    assert compat.tensorrt_version() == "8.6.1.6"  # what the engine-directory check reports


def test_tensorrt_10_and_11_count_and_stubs_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    from ism_edge_engines import tensorrt_build

    for version in ("10.3.0.30", "11.1.0.106"):
        monkeypatch.setitem(sys.modules, "tensorrt", fake.tensorrt_module(fake.FakeCudaDriver(), version=version))
        assert tensorrt_usable() and tensorrt_build.tensorrt_available() and compat.tensorrt_version() == version
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # what tensorrt-stubs gives
    assert not tensorrt_usable() and compat.tensorrt_version() is None
    assert [major_version(v) for v in ("10.3.0.30", "8.6", "", "x")] == [10, 8, 0, 0]


def test_a_missing_tensorrt_says_where_it_comes_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    with pytest.raises(MissingDependencyError) as err:
        tensorrt_module("building TensorRT engines")
    message = str(err.value)
    assert "pip install 'ism-edge[tensorrt]' --extra-index-url https://pypi.nvidia.com" in message
    assert "docs/jetson.md" in message and "\n" not in message
    assert compat.tensorrt_version() is None and not tensorrt_usable()
