"""The export/compile path: defense bundle → ONNX → TensorRT / ONNX Runtime engines (SPEC §4).

* :mod:`engines.export` — bundle → FP32 ONNX graphs with a dynamic batch axis;
* :mod:`engines.fp16` — FP32 graph → mixed-precision FP16 graph with FP32 I/O;
* :mod:`engines.parity` — graphs and engines against PyTorch on real samples;
* :mod:`engines.ort_build` — ONNX Runtime optimized and INT8 models;
* :mod:`engines.tensorrt_build` — strongly typed TensorRT engines;
* :mod:`engines.build` — the whole build into an engine directory, and rebuilds.

Importing this package imports neither torch nor onnx; they are imported where used.
"""
