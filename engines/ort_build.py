"""ONNX → ONNX Runtime artifacts: optimized models and INT8 (static QDQ) models (SPEC §4).

Optimized models are saved at ``ORT_ENABLE_EXTENDED`` (constant folding, redundant-node removal
and fusions such as Conv+activation), so a session starts without re-optimising. ``ALL`` would
also bake in the CPU-specific NCHWc layout, which ties the file to one instruction set; the
runtime applies the layout optimisations at load time instead. The saved model holds fused ops of
the ``com.microsoft`` domain, so it is tied to the ONNX Runtime major.minor that wrote it
(:func:`ism_edge.compat.check_compatible` enforces this).

Imports neither torch nor onnx: the runtime can call :func:`optimized_model_from_onnx` on a
Jetson with the base install (``--rebuild-on-mismatch``).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ism_edge.errors import EngineError

OPTIMIZATION_LEVEL = "extended"
INT8_OPS = ("Conv",)


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


def session(path: str | os.PathLike[str], *, threads: int | None = None, optimize: bool = True) -> Any:
    """A CPU :class:`onnxruntime.InferenceSession` for ``path``; errors name the file."""
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises Fail / InvalidGraph / InvalidProtobuf
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EngineError(f"ONNX Runtime cannot load {path} ({first}): rebuild it with 'ism-edge build'") from None


def runner(sess: Any) -> Any:
    """``feed -> {output name: array}`` for a session (the parity module's runner protocol)."""
    names = [o.name for o in sess.get_outputs()]

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, sess.run(names, feed), strict=True))

    return run


def optimized_model_from_onnx(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Save the ``ORT_ENABLE_EXTENDED``-optimized model of ``src`` to ``dst`` for the CPU provider."""
    ort = _ort()
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(dst)
    try:
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EngineError(f"ONNX Runtime cannot optimize {src} ({first}): re-export it with 'ism-edge export'") from None
    if not dst.is_file():
        raise EngineError(f"ONNX Runtime did not write the optimized model {dst}: check free disk space")
    return dst


class _Feeds:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over a list of feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - only used by some calibrators
        raise NotImplementedError


def int8_from_onnx(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    calibration: Mapping[str, np.ndarray],
    *,
    batch: int = 32,
) -> Path:
    """Static INT8 quantization of ``src`` (QDQ format) calibrated on clean samples.

    ``calibration`` maps each graph input to float32 arrays (clean pixels in [0, 1] for ``x``).
    Only ``Conv`` is quantized (per-channel signed INT8 weights, unsigned INT8 activations,
    min-max calibration, the combination ONNX Runtime recommends for x86-64 and ARM64 CPUs):
    also quantizing ``Gemm`` and ``ConvTranspose`` flipped up to 35 % of the defense's labels on
    small trained bundles (measured; see docs/engines.md). The reconstruction error, the input
    normalisation, the k-sparse selection, the dense layers and the sigmoids stay FP32.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(calibration.values())))
    feeds = [{k: np.ascontiguousarray(v[i:i + batch]) for k, v in calibration.items()} for i in range(0, n, batch)]
    with tempfile.TemporaryDirectory(prefix="ism-edge-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre),
                str(dst),
                _Feeds(feeds),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(INT8_OPS),
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"CalibTensorRangeSymmetric": False},
                calibration_providers=["CPUExecutionProvider"],
            )
        except EngineError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise EngineError(f"INT8 quantization of {src} failed ({first}): build with --precision fp32") from None
    return dst


def latency_ms(path: str | os.PathLike[str], feed: Mapping[str, np.ndarray], *, repeats: int = 5) -> float:
    """Median wall-clock latency of one ``run`` of ``path`` on ``feed`` (after one warm-up), in ms."""
    sess = session(path)
    sess.run(None, dict(feed))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, dict(feed))
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))
