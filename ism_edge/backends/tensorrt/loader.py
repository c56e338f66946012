"""Where TensorRT is imported: the one check that a real TensorRT, 10 or newer, is installed.

Two things pass for ``import tensorrt`` without being a usable TensorRT:

* ``tensorrt-stubs`` (installed for mypy) makes ``import tensorrt`` succeed as an empty namespace
  package, so TensorRT counts as installed only when the module has ``Builder``;
* an older TensorRT (8.x from an older JetPack's apt, never version-checked by apt) imports fine
  and then dies on ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, ``execute_async_v3`` or
  ``ParserError.node_name`` with an ``AttributeError``. Its major version is checked here, where
  the module is loaded, and the error says what is needed.

The backend (:mod:`ism_edge.backends.tensorrt.runner`), the builder (:mod:`ism_edge_engines.tensorrt_build`)
and the engine-directory check (:mod:`ism_edge.compat`) all ask this module.
"""

from __future__ import annotations

import re
from typing import Any

from ism_edge.errors import MissingDependencyError

MIN_MAJOR = 10
WHERE_TO_GET = (
    "on a Jetson, JetPack 6.1 or newer (TensorRT 10.3 from apt, docs/jetson.md); on x86_64, "
    "pip install 'ism-edge[tensorrt-cu12]' --extra-index-url https://pypi.nvidia.com"
)


def real_tensorrt() -> Any | None:
    """The ``tensorrt`` module when a real TensorRT (any version) imports, else None."""
    try:
        import tensorrt
    except (ImportError, OSError):  # OSError: the bindings import but their libnvinfer does not load
        return None
    return tensorrt if hasattr(tensorrt, "Builder") else None


def major_version(version: str) -> int:
    """The major version of a TensorRT version string (``"10.3.0.30"`` → 10; unreadable → 0)."""
    match = re.match(r"\s*(\d+)", version)
    return int(match.group(1)) if match else 0


def tensorrt_version() -> str | None:
    """The installed real TensorRT's version (whatever its major), or None without one."""
    trt = real_tensorrt()
    return None if trt is None else str(getattr(trt, "__version__", "unknown"))


def tensorrt_module(purpose: str = "the TensorRT backend") -> Any:
    """Import TensorRT for ``purpose``, or raise the one-line error saying what to install.

    Raises :class:`~ism_edge.errors.MissingDependencyError` when TensorRT is missing (or only
    its stubs are installed) and when it is older than TensorRT :data:`MIN_MAJOR`.
    """
    trt = real_tensorrt()
    if trt is None:
        raise MissingDependencyError(
            f"{purpose} needs the Python module 'tensorrt', which is not installed: on x86_64, "
            "pip install 'ism-edge[tensorrt]' --extra-index-url https://pypi.nvidia.com ([tensorrt-cu13] for a CUDA 13 "
            "driver); on a Jetson, JetPack 6's TensorRT from apt (docs/jetson.md)"
        )
    version = str(getattr(trt, "__version__", "unknown"))
    if major_version(version) < MIN_MAJOR:
        raise MissingDependencyError(
            f"{purpose} needs TensorRT {MIN_MAJOR} or newer (strongly typed networks, execute_async_v3), "
            f"but TensorRT {version} is installed: {WHERE_TO_GET}; or use --backend onnxruntime"
        )
    return trt


def tensorrt_usable() -> bool:
    """True when a real TensorRT of a supported version imports (no GPU check)."""
    try:
        tensorrt_module()
    except MissingDependencyError:
        return False
    return True
