"""ONNX → ONNX Runtime artifacts: optimized models and INT8 (static QDQ) models (docs/engines.md, "ONNX Runtime build").

:func:`build` is the ONNX Runtime step of :func:`ism_edge_engines.build.build_engines`: the FP32/FP16
graphs with their transposed convolutions as sub-pixel convolutions (:mod:`ism_edge_engines.subpixel`), or
INT8 graphs calibrated on clean images, optimized and checked against PyTorch
(:func:`parity_of_files`, which the export's graph gate runs too).

Optimized models are saved at ``ORT_ENABLE_EXTENDED`` (constant folding, redundant-node removal
and fusions such as Conv+activation), so a session starts without re-optimising. ``ALL`` would
also bake in the CPU-specific NCHWc layout, which ties the file to one instruction set; the
runtime applies the layout optimisations at load time instead. The saved model holds fused ops of
the ``com.microsoft`` domain, so it is tied to the ONNX Runtime major.minor that wrote it
(:func:`ism_edge.compat.check_compatible` enforces this).

Imports neither torch nor onnx: the runtime can call :func:`optimized_models` on a Jetson with
the base install and ONNX Runtime (``--rebuild-on-mismatch``). Without ONNX Runtime every entry
point raises the one-line error naming the extra to install.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ism_edge._io import sha256_file
from ism_edge.errors import EngineError, missing_dependency
from ism_edge.manifest import ROLES
from ism_edge_engines.artifacts import Built, engine_file_name, source_name
from ism_edge_engines.progress import Steps

if TYPE_CHECKING:
    from ism_edge_engines.export import Exported
    from ism_edge_training.bundle import DefenseBundle

OPTIMIZATION_LEVEL = "extended"
INT8_OPS = ("Conv",)
CALIBRATION_SAMPLES = 256
_PURPOSE = "building and checking ONNX Runtime engines"


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise missing_dependency("onnxruntime", "onnxruntime", _PURPOSE) from None
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
        raise EngineError(
            f"ONNX Runtime cannot optimize {src} ({first}): re-export it with 'ism-edge export'"
        ) from None
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
    also quantizing ``Gemm`` and ``ConvTranspose`` flipped many of the defense's labels on small
    trained bundles (docs/engines.md). The reconstruction error, the input
    normalisation, the k-sparse selection, the dense layers and the sigmoids stay FP32.
    """
    try:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise missing_dependency("onnxruntime", "onnxruntime", _PURPOSE) from None

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


def optimized_models(sources: Mapping[str, Path], root: Path, precision: str, steps: Steps) -> dict[str, Path]:
    """Each role's optimized model, from its source graph, saved in ``root``; ``{role: path}``."""
    out: dict[str, Path] = {}
    for role, src in sources.items():
        with steps(f"optimize {role} for ONNX Runtime"):
            out[role] = optimized_model_from_onnx(src, root / engine_file_name("onnxruntime", precision, role))
    return out


def parity_of_files(
    files: Mapping[str, Path],
    root: Path,
    precision: str,
    bundle: DefenseBundle,
    x: np.ndarray,
    reference: Mapping[str, Mapping[str, np.ndarray]],
    torch_defense: Mapping[str, np.ndarray],
    batch: int,
) -> dict[str, Any]:
    """Graph- and defense-level parity of three ONNX Runtime-loadable files against PyTorch (the
    defense run by the runtime's backend and decision code, :func:`ism_edge_engines.parity.defense_outputs`)."""
    from ism_edge_engines import parity

    tol = parity.TOLERANCES[precision]
    runners = {role: runner(session(path)) for role, path in files.items()}
    graphs: dict[str, Any] = {}
    for role, path in files.items():
        feed = parity.graph_inputs(role, x, reference)
        ours = parity.run_batched(runners[role], feed, batch)
        graphs[role] = parity.graph_report(role, path.relative_to(root).as_posix(), sha256_file(path), ours,
                                           reference[role], tol)
    ours_defense = parity.defense_outputs(files, root, bundle, x, batch=batch)
    defense = parity.compare_defense(ours_defense, torch_defense, tol, bundle.thresholds)
    ok = all(g["ok"] for g in graphs.values()) and defense["ok"]
    return {"precision": precision, "graphs": graphs, "defense": defense, "ok": ok}


def build(
    ex: Exported, precision: str, *, opt_batch: int, calibration_samples: np.ndarray | None, steps: Steps
) -> Built:
    """Optimized ONNX Runtime models of the exported graphs, checked against PyTorch.

    FP32 and FP16 builds compile the graphs with their transposed convolutions rewritten as
    sub-pixel convolutions; INT8 builds compile graphs quantized on ``calibration_samples``
    (float32 NCHW pixels in [0, 1], clean; by default the committed training-split images) and
    report each graph's CPU latency against FP32 at the ``opt_batch`` size.
    """
    report: dict[str, Any] = {}
    if precision == "int8":
        sources = _quantize(ex, calibration_samples, steps, report)
    else:
        with steps("rewrite transposed convolutions as sub-pixel convolutions"):
            sources = _subpixel_sources(ex.graphs[precision])
    engines = optimized_models(sources, ex.root, precision, steps)
    with steps(f"parity of the built {precision.upper()} engines"):
        report["engine"] = parity_of_files(engines, ex.root, precision, ex.bundle, ex.x, ex.reference, ex.torch_defense,
                                           ex.parity_batch)
    if precision == "int8":
        with steps("INT8 vs FP32 latency"):
            report["int8_latency_ms"] = _int8_latency(ex.graphs["fp32"], engines, ex.x, ex.reference, opt_batch)
    return Built(engines=engines, sources=sources, report=report, measured=True)


def _subpixel_sources(graphs: Mapping[str, Path]) -> dict[str, Path]:
    """ONNX Runtime sources: each graph with its strided transposed convolutions rewritten
    (``onnx/{role}[.fp16].subpixel.onnx``, :mod:`ism_edge_engines.subpixel`), or the graph itself when it has none."""
    from ism_edge_engines.subpixel import subpixel_from_onnx

    return {role: subpixel_from_onnx(path, path.with_name(f"{path.name.removesuffix('.onnx')}.subpixel.onnx")) or path
            for role, path in graphs.items()}


def _quantize(ex: Exported, calibration: np.ndarray | None, steps: Steps, report: dict[str, Any]) -> dict[str, Path]:
    """INT8 QDQ graphs calibrated on clean images x and their reconstructions M(x).

    The classifier runs on both x and x̂ in deployment, so it is calibrated on both; the
    perturbation graph on the pairs (x, M(x)).
    """
    from ism_edge_engines.samples import real_samples

    fp32, input_shape = ex.graphs["fp32"], ex.input_shape
    with steps("read calibration samples"):
        if calibration is None:
            cal, source = real_samples(input_shape, CALIBRATION_SAMPLES, split="train")
        else:
            cal = np.ascontiguousarray(calibration, dtype=np.float32)
            if cal.ndim != 4 or cal.shape[1:] != input_shape:
                raise ValueError(f"calibration_samples must be float32 N×{'×'.join(map(str, input_shape))} pixels "
                                 f"in [0, 1], got {cal.shape}")
            source = f"{len(cal)} user-supplied clean images"
        x_hat = runner(session(fp32["mapper"]))({"x": cal})["x_hat"]
    report["calibration"] = {"n": int(len(cal)), "source": source,
                             "method": "minmax, static QDQ, per-channel S8 weights, U8 activations"}
    feeds = {"mapper": {"x": cal}, "classifier": {"x": np.concatenate([cal, x_hat])},
             "perturbation": {"x": cal, "x_hat": x_hat}}
    out: dict[str, Path] = {}
    for role in ROLES:
        with steps(f"quantize {role} to INT8"):
            out[role] = int8_from_onnx(fp32[role], ex.root / source_name("int8", role), feeds[role])
    return out


def _int8_latency(fp32: Mapping[str, Path], engines: Mapping[str, Path], x: np.ndarray,
                  reference: Mapping[str, Mapping[str, np.ndarray]], opt_batch: int) -> dict[str, Any]:
    """Median CPU latency of each FP32 graph and its INT8 engine at the opt batch size (ms)."""
    from ism_edge_engines import parity

    n = min(opt_batch, len(x))
    out: dict[str, Any] = {"batch": n}
    for role in ROLES:
        feed = {k: v[:n] for k, v in parity.graph_inputs(role, x, reference).items()}
        out[role] = {"fp32": latency_ms(fp32[role], feed), "int8": latency_ms(engines[role], feed)}
    return out
