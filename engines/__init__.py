"""The export/compile path: defense bundle → ONNX → TensorRT / ONNX Runtime engines (docs/engines.md).

* :mod:`ism_edge_engines.export` — bundle → FP32 and FP16 ONNX graphs with a dynamic batch axis, gated on
  parity (``ism-edge export``, and the opening of every build);
* :mod:`ism_edge_engines.fp16` — FP32 graph → mixed-precision FP16 graph with FP32 I/O;
* :mod:`ism_edge_engines.parity` — graphs and engines against PyTorch on real samples;
* :mod:`ism_edge_engines.build` — the build's options and common step: export, one backend's build,
  the parity gates, the manifest (``ism-edge build BUNDLE``);
* :mod:`ism_edge_engines.ort_build` — the ONNX Runtime build: optimized and INT8 models;
* :mod:`ism_edge_engines.tensorrt_build` — the TensorRT build: strongly typed TensorRT engines;
* :mod:`ism_edge_engines.rebuild` — an engine directory recompiled from its stored ONNX for this machine
  (``ism-edge build ENGINE_DIR``, ``ism-edge run --rebuild-on-mismatch``);
* :mod:`ism_edge_engines.artifacts` — file names, recorded versions and checks shared by all of them;
* :mod:`ism_edge_engines.progress` — the named, timed steps the CLI prints.

Importing this package imports neither torch nor onnx; they are imported where used.
"""
