"""``ism-edge bench``: how fast the defense chain runs, side by side, and at camera rate (docs/performance.md).

* :mod:`ism_edge.bench.chain` — the same inputs through PyTorch eager, ONNX Runtime FP32/INT8
  and TensorRT: throughput, latency, per-stage times, ratios, share of the GEMM peak;
* :mod:`ism_edge.bench.stream` — the ``ism-edge run`` loop on a paced 30 fps video;
* :mod:`ism_edge.bench.flops` — FLOP counts from the ONNX graphs;
* :mod:`ism_edge.bench.peak` — the measured GEMM peak of the machine;
* :mod:`ism_edge.bench.frames` — camera-like frames from real photographs.

No timing here is asserted by a test: the figures are measured by the command and recorded in
``docs/performance.md``. Torch is never imported by this package; the PyTorch-eager column is
``ism_edge_engines.bench_torch.TorchEagerChain``, passed in as a :class:`~ism_edge.bench.chain.Column`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ism_edge.bench.chain import (
    COMPILED,
    EAGER,
    BenchConfig,
    Chain,
    ChainResult,
    Column,
    RuntimeChain,
    default_threads,
    run_chain_bench,
    runtime_column,
)
from ism_edge.errors import EngineError, IsmEdgeError
from ism_edge.manifest import EngineManifest, load_manifest

INT8_HINT = "build one with 'ism-edge build BUNDLE --backend onnxruntime --precision int8 --out DIR' and pass it too"


def load_engine_dirs(dirs: Sequence[str | Path], bundle: str | Path | None = None) -> list[tuple[Path, EngineManifest]]:
    """Read the manifests of ``dirs``; refuse directories of different bundles (one line).

    With ``bundle``, also refuse engines that were not built from it (so the PyTorch column runs
    the same defense).
    """
    from ism_edge.compat import bundle_sha256

    out = [(Path(d), load_manifest(d, verify_files=False)) for d in dirs]
    if not out:
        raise EngineError("no engine directory given: pass one written by 'ism-edge build'")
    first_dir, first = out[0]
    for d, m in out[1:]:
        if m.bundle_sha256 != first.bundle_sha256 or tuple(m.input_shape) != tuple(first.input_shape):
            raise EngineError(
                f"{d} and {first_dir} were built from different bundles: "
                "benchmark engine directories of one bundle together"
            )
    if bundle is not None and bundle_sha256(bundle) != first.bundle_sha256:
        raise EngineError(
            f"bundle {bundle} is not the one the engines in {first_dir} were built from: "
            "pass the bundle given to 'ism-edge build'"
        )
    return out


def engine_columns(engines: Sequence[tuple[Path, EngineManifest]], *, threads: int, device: str = "cpu",
                   spinning: bool | None = None) -> list[Column]:
    """The compiled columns: ONNX Runtime per precision given (FP32 and INT8 always listed) and
    TensorRT FP16, each either runnable or with the reason it is not run here."""
    from ism_edge.backends import backend_class

    columns: dict[str, Column] = {}
    for d, m in engines:
        if m.backend != "onnxruntime":
            continue
        name = f"onnxruntime-{m.precision}"
        if name not in columns:
            columns[name] = runtime_column(name, f"ONNX Runtime {m.precision.upper()}", d, backend="onnxruntime",
                                           threads=threads, device=device, spinning=spinning)
    trt_dirs = [(d, m) for d, m in engines if m.backend == "tensorrt"]
    if "onnxruntime-fp32" not in columns:
        columns["onnxruntime-fp32"] = Column("onnxruntime-fp32", "ONNX Runtime FP32",
                                             reason="no ONNX Runtime FP32 engine directory given")
    if "onnxruntime-int8" not in columns:
        columns["onnxruntime-int8"] = Column("onnxruntime-int8", "ONNX Runtime INT8",
                                             reason=f"no INT8 engine directory given: {INT8_HINT}")
    trt = backend_class("tensorrt")
    try:
        trt.check_available()
        trt_reason = None
    except IsmEdgeError as e:
        trt_reason = f"not available here: {e}"
    if trt_dirs and trt_reason is None:
        d, m = trt_dirs[0]
        columns["tensorrt"] = runtime_column("tensorrt", f"TensorRT {m.precision.upper()}", d, backend="tensorrt",
                                             threads=threads)
    else:
        reason = trt_reason or ("no TensorRT engine directory given: "
                                "build one on this GPU with 'ism-edge build BUNDLE --backend tensorrt --out DIR'")
        columns["tensorrt"] = Column("tensorrt", "TensorRT FP16", reason=reason)
    order = ["onnxruntime-fp32", "onnxruntime-fp16", "onnxruntime-int8", "tensorrt"]
    return [columns[k] for k in order if k in columns]


__all__ = [
    "COMPILED",
    "EAGER",
    "BenchConfig",
    "Chain",
    "ChainResult",
    "Column",
    "RuntimeChain",
    "default_threads",
    "engine_columns",
    "load_engine_dirs",
    "run_chain_bench",
    "runtime_column",
]
