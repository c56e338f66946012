"""Bundle → engine directory: the build's options and its common step (docs/engines.md).

:func:`build_engines` exports the graphs and gates them on parity (:func:`ism_edge_engines.export.exported`),
hands them to one backend's ``build()`` (:func:`ism_edge_engines.ort_build.build`,
:func:`ism_edge_engines.tensorrt_build.build`), gates what was built, and writes the manifest. A directory
is recompiled for another machine by :func:`ism_edge_engines.rebuild.rebuild_from_onnx`.

An engine directory (written atomically: a temporary sibling renamed into place, so an
interrupted build leaves nothing behind)::

    DIR/
      manifest.json                 ism_edge.manifest.EngineManifest (parity report included)
      onnx/{role}.onnx              FP32 source graph (dynamic batch axis N, opset 18)
      onnx/{role}.fp16.onnx         mixed-precision FP16 graph, FP32 I/O (ism_edge_engines.fp16)
      onnx/{role}.int8.onnx         QDQ INT8 graph (ONNX Runtime INT8 builds only)
      onnx/{role}[.fp16].subpixel.onnx  ONNX Runtime FP32/FP16 source: transposed convolutions as
                                    sub-pixel convolutions (engines.subpixel; mapper only)
      {role}.onnx | {role}.fp16.onnx | {role}.int8.onnx   ONNX Runtime optimized model
      {role}.plan                   TensorRT engine (TensorRT builds)

Importing this module imports neither torch nor onnx; :func:`build_engines` needs both (it
exports and checks parity against PyTorch) and says so in one line where they are missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ism_edge._io import sha256_file
from ism_edge.errors import EngineError
from ism_edge.manifest import (
    BACKENDS,
    ROLES,
    EngineManifest,
)
from ism_edge_engines import ort_build, parity, tensorrt_build
from ism_edge_engines.artifacts import ONNX_DIR, Built, check_out_dir, decision_fields, library_versions, now
from ism_edge_engines.export import OPSET, PARITY_SAMPLES, engine_file, exported
from ism_edge_engines.progress import StepCallback, Steps

BACKEND_CHOICES = ("auto", *BACKENDS)
PRECISION_CHOICES = ("fp32", "fp16", "int8")
DEFAULT_BATCH = (1, 8, 64)
DEFAULT_WORKSPACE_MB = 1024


def resolve_backend(backend: str) -> str:
    """``auto`` → ``tensorrt`` when a real TensorRT is importable, else ``onnxruntime``."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
    if backend != "auto":
        return backend
    return "tensorrt" if tensorrt_build.tensorrt_available() else "onnxruntime"


def default_precision(backend: str) -> str:
    """FP16 for TensorRT; FP32 for ONNX Runtime on CPU, where FP16 is slower (docs/engines.md)."""
    return "fp16" if resolve_backend(backend) == "tensorrt" else "fp32"


def check_options(backend: str, precision: str, batch: tuple[int, int, int], workspace_mb: int) -> None:
    """Refuse a precision, backend/precision pair, batch profile or workspace the build cannot honour."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    if backend == "tensorrt" and precision == "int8":
        raise EngineError("INT8 TensorRT engines are not supported: "
                          "build with --precision fp16 (TensorRT) or --backend onnxruntime --precision int8")
    if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
        raise ValueError(f"batch must be MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got {batch}")
    if workspace_mb < 1:
        raise ValueError(f"workspace must be >= 1 MB, got {workspace_mb}")


def build_engines(
    bundle_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    batch: tuple[int, int, int] = DEFAULT_BATCH,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | os.PathLike[str] | None = None,
    calibration_samples: np.ndarray | None = None,
    parity_samples: int = PARITY_SAMPLES,
    on_step: StepCallback | None = None,
) -> Path:
    """Compile a defense bundle into an engine directory at ``out_dir``; returns ``out_dir``.

    Exports the mapper, classifier and perturbation graphs (FP32 and FP16), checks their parity
    against PyTorch on ``parity_samples`` real images, builds the backend's engines
    (``backend``: ``onnxruntime``, ``tensorrt`` or ``auto``), checks the parity of what was built
    (ONNX Runtime), and writes the manifest. ``calibration_samples`` (float32 NCHW pixels in
    [0, 1], clean) calibrate INT8; by default the committed training-split images are used.
    A graph outside tolerance raises :class:`ism_edge.errors.ParityError` naming it; nothing is
    left at ``out_dir`` unless the whole build succeeded.
    """
    backend = resolve_backend(backend)
    batch = (int(batch[0]), int(batch[1]), int(batch[2]))
    check_options(backend, precision, batch, workspace_mb)
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    check_out_dir(out_dir, bundle_dir)
    steps = Steps(on_step)
    gpu = tensorrt_build.gpu_for_build() if backend == "tensorrt" else None
    versions = library_versions(backend, opset=OPSET)

    with exported(bundle_dir, out_dir, steps, parity_samples=parity_samples, onnx_dir=ONNX_DIR, calibrated=True) as ex:
        gated = ["fp16" if precision == "fp16" else "fp32"]
        parity.raise_on_failure(ex.report[gated[0]], gated[0].upper(), ex.sample_source)
        built: Built
        if backend == "onnxruntime":
            built = ort_build.build(ex, precision, opt_batch=batch[1], calibration_samples=calibration_samples,
                                    steps=steps)
        else:
            built = tensorrt_build.build(ex.graphs[precision], ex.root, precision, steps,
                                         batch=tensorrt_build.BatchProfile(*batch), workspace_mb=workspace_mb,
                                         timing_cache=timing_cache)
        report = {**ex.report, **built.report}
        if built.measured:
            gated.append("engine")
        report["gated"] = gated
        report["ok"] = all(report[g]["ok"] for g in gated)
        report["sources"] = {
            p.relative_to(ex.root).as_posix(): sha256_file(p) for p in sorted((ex.root / ONNX_DIR).glob("*.onnx"))
        }
        if "engine" in gated:
            parity.raise_on_failure(report["engine"], f"built {precision.upper()}", ex.sample_source)

        with steps("write manifest"):
            bundle, shape = ex.bundle, ex.input_shape
            manifest = EngineManifest(
                backend=backend,
                precision=precision,
                input_shape=shape,
                **decision_fields(bundle),  # every threshold is there: checked before the build started
                batch={"min": batch[0], "opt": batch[1], "max": batch[2]},
                engines={role: engine_file(role, built.engines[role], built.sources[role], ex.root, shape,
                                           bundle.config.num_classes) for role in ROLES},
                bundle_sha256=ex.bundle_sha256,
                bundle_name=bundle_dir.resolve().name,
                color_order="RGB",
                versions=versions,
                gpu=gpu,
                parity=report,
                created=now(),
            )
            manifest.save(ex.root)
    steps.done()
    return out_dir
