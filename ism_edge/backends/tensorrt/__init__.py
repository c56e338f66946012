"""TensorRT backend: deserialized engines, pinned buffers, one CUDA stream per engine.

Importing this package imports neither TensorRT nor CUDA bindings; both load on activation.
"""

from ism_edge.backends.tensorrt.loader import tensorrt_module
from ism_edge.backends.tensorrt.runner import TensorRTBackend

__all__ = ["TensorRTBackend", "tensorrt_module"]
