"""What the export, the build and the rebuild write, and what they check before writing it.

* the file names inside an engine directory (:func:`engine_file_name`, :func:`source_name`);
* :class:`Built`, what a backend's ``build()`` (:mod:`ism_edge_engines.ort_build`,
  :mod:`ism_edge_engines.tensorrt_build`) hands back to :func:`ism_edge_engines.build.build_engines`;
* the refusal to replace anything but an earlier output (:func:`check_out_dir`);
* the library versions and time an output records (:func:`library_versions`, :func:`now`); the
  versions are read before any work, so a library this install lacks is a one-line error naming
  the extra to install rather than a traceback halfway through.

Imports neither torch nor onnx.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ism_edge.errors import EngineError, missing_dependency
from ism_edge.manifest import (
    DEFAULT_DETECTOR_TEMPERATURE,
    MANIFEST_NAME,
    MAX_THRESHOLD,
    SCORE_NAMES,
)

ONNX_DIR = "onnx"
EXPORT_REPORT = "export.json"


def engine_file_name(backend: str, precision: str, role: str) -> str:
    """File name of a role's engine in the directory (see :mod:`ism_edge_engines.build`)."""
    if backend == "tensorrt":
        return f"{role}.plan"
    return f"{role}.onnx" if precision == "fp32" else f"{role}.{precision}.onnx"


def source_name(precision: str, role: str) -> str:
    """Path (relative to the engine directory) of the ONNX graph a role's engine is compiled from."""
    return f"{ONNX_DIR}/{role}.onnx" if precision == "fp32" else f"{ONNX_DIR}/{role}.{precision}.onnx"


@dataclass(frozen=True)
class Built:
    """What a backend's ``build()`` wrote into the engine directory.

    ``engines`` and ``sources`` map each role to its engine file and to the ONNX graph it was
    compiled from; ``report`` holds the parity-report entries of the build: ``"engine"`` (the
    built engines' parity, or why they were not run) and any others (INT8 calibration and
    latency); ``measured`` says whether ``report["engine"]`` is a measurement that gates the build.
    """

    engines: dict[str, Path]
    sources: dict[str, Path]
    report: dict[str, Any]
    measured: bool


def check_out_dir(out_dir: Path, *sources: Path, marker: str = MANIFEST_NAME) -> None:
    """Refuse to replace anything but an earlier output (atomic_directory swaps the whole folder)."""
    kind = "an engine" if marker == MANIFEST_NAME else "an ONNX export"
    for src in sources:
        if out_dir.resolve() == src.resolve():
            raise EngineError(f"--out {out_dir} is the source directory itself: choose another output directory")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / marker).is_file())):
        raise EngineError(f"{out_dir} exists and is not {kind} directory: choose another --out or remove it")


def now() -> str:
    """The current UTC time, ISO 8601 to the second (the ``created`` of manifests and reports)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _version(module: str, extra: str, purpose: str) -> str:
    try:
        return str(importlib.import_module(module).__version__)
    except ImportError:
        raise missing_dependency(module, extra, purpose) from None


def library_versions(backend: str, *, opset: int | None = None) -> dict[str, str]:
    """The library versions an output records; raises the one-line error of a missing library.

    ``opset`` (the ONNX opset exported at) is given for an export or a build from a bundle, which
    also needs torch and onnx (the ``train`` extra) and ONNX Runtime for its parity check. Without
    it, a rebuild from stored ONNX: ONNX Runtime is needed for ONNX Runtime engines only, and
    recorded for TensorRT ones where it is installed. TensorRT builds record TensorRT's version
    (and fail without it).
    """
    import numpy

    import ism_edge

    from_bundle = opset is not None
    if from_bundle:
        purpose, ort_extra = "compiling a defense bundle", "train"
    else:
        purpose, ort_extra = "rebuilding ONNX Runtime engines", "onnxruntime"
    v = {"ism_edge": ism_edge.__version__}
    if from_bundle or backend == "onnxruntime":
        v["onnxruntime"] = _version("onnxruntime", ort_extra, purpose)
    else:
        from ism_edge.compat import onnxruntime_version

        if (ort := onnxruntime_version()) is not None:
            v["onnxruntime"] = ort
    v.update({"numpy": numpy.__version__, "python": platform.python_version()})
    if from_bundle:
        v.update({"torch": _version("torch", "train", purpose), "onnx": _version("onnx", "train", purpose),
                  "opset": str(opset)})
    if backend == "tensorrt":
        from ism_edge_engines.tensorrt_build import tensorrt_version

        v["tensorrt"] = tensorrt_version()
    return v


def decision_fields(bundle: Any) -> dict[str, Any]:
    """A ``ism_edge_training.bundle.DefenseBundle``'s facts the runtime decides with, as engine-manifest
    fields (the build writes them; the parity gate runs with them). A detector without a threshold
    never flags. (``Any``: this module is type-checked with the TensorRT builder, apart from torch.)"""
    return {
        "class_names": tuple(bundle.class_names),
        "thresholds": {s: float(bundle.thresholds.get(s, MAX_THRESHOLD)) for s in SCORE_NAMES},
        "temperatures": {"deploy": float(bundle.temperatures.get("deploy", 1.0)),
                         "detector": float(bundle.temperatures.get("detector", DEFAULT_DETECTOR_TEMPERATURE))},
        "target_fpr": float(bundle.target_fpr),
        "feedback_rounds": int(bundle.feedback_rounds),
        "label_source": bundle.label_source,
        # a user's own classifier: where it came from, the input contract its graph converts to, and how
        # its copy was fine-tuned (``ism-edge train --finetune``)
        "classifier": {k: v for k, v in getattr(bundle, "classifier_record", {}).items()
                       if k in ("origin", "input", "num_classes", "finetuned")},
    }
