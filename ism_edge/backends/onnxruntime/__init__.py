"""ONNX Runtime backend (CPU by default; the CUDA execution provider when onnxruntime-gpu is installed)."""

from ism_edge.backends.onnxruntime.runner import OnnxRuntimeBackend

__all__ = ["OnnxRuntimeBackend"]
