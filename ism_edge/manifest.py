"""The engine-directory manifest: the contract between ``engines/`` (writer) and the runtime.

An engine directory holds one compiled artifact per network plus its ONNX source and a
``manifest.json``. The runtime reads shapes, thresholds, class names and temperatures from the
manifest, never from constants. Graph I/O (names are part of the contract):

=============  =========================================  ==========================================
role           inputs                                     outputs
=============  =========================================  ==========================================
mapper         ``x`` [N,C,H,W] float32 pixels in [0, 1]   ``x_hat`` [N,C,H,W], ``recon_error`` [N]
classifier     ``x`` [N,C,H,W]                            ``logits`` [N,K] (deployed temperature 1)
perturbation   ``x``, ``x_hat`` [N,C,H,W]                 ``p_score`` [N] = P(attacked) in [0, 1]
=============  =========================================  ==========================================

``recon_error`` is the mean absolute error ‖x − M(x)‖₁ / (C·H·W) per sample. The JSD detector is
computed by the runtime from the two classifier outputs (``ism_edge.scores.jsd``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ism_edge._io import atomic_write_json, sha256_file
from ism_edge.errors import EngineError

ENGINE_FORMAT = "ism-edge-engines"
ENGINE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ROLES = ("mapper", "classifier", "perturbation")
BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
SCORE_NAMES = ("recon_error", "jsd", "p_score")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``shape`` uses -1 for the dynamic batch axis."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(name=str(d["name"]), shape=tuple(int(s) for s in d["shape"]), dtype=str(d.get("dtype", "float32")))


@dataclass(frozen=True)
class EngineFile:
    """One compiled network: ``file`` is what the backend loads, ``onnx`` the source it came from."""

    role: str
    file: str
    onnx: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineFile:
        return cls(
            role=str(d["role"]),
            file=str(d["file"]),
            onnx=str(d["onnx"]),
            sha256=str(d["sha256"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
        )


@dataclass(frozen=True)
class EngineManifest:
    """Everything the runtime needs to run an engine directory (SPEC §4)."""

    backend: str
    precision: str
    input_shape: tuple[int, int, int]  # (C, H, W) of one model input
    class_names: tuple[str, ...]
    thresholds: dict[str, float]
    temperatures: dict[str, float]  # {"deploy": 1.0, "detector": T_jsd}
    target_fpr: float
    batch: dict[str, int]  # {"min", "opt", "max"}
    engines: dict[str, EngineFile]
    bundle_sha256: str
    bundle_name: str = ""
    color_order: str = "RGB"
    feedback_rounds: int = 0
    label_source: str = "auto"  # "auto": C(x̂) only for flagged inputs, else C(x); "reformed": always C(x̂)
    versions: dict[str, str] = field(default_factory=dict)
    gpu: dict[str, str] | None = None  # TensorRT only: {"name", "compute_capability"}
    parity: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    # thresholds re-calibrated on a deployment's clean frames (ism_edge.calibration): the latest
    # record, with the thresholds it replaced; empty while the bundle's thresholds are in force
    calibration: dict[str, Any] = field(default_factory=dict)
    format: str = ENGINE_FORMAT
    format_version: int = ENGINE_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise EngineError(f"engine manifest: backend {self.backend!r} is not one of {BACKENDS}")
        if self.precision not in PRECISIONS:
            raise EngineError(f"engine manifest: precision {self.precision!r} is not one of {PRECISIONS}")
        missing = [r for r in ROLES if r not in self.engines]
        if missing:
            raise EngineError(f"engine manifest: no engine for {', '.join(missing)}")
        missing = [s for s in SCORE_NAMES if s not in self.thresholds]
        if missing:
            raise EngineError(f"engine manifest: no threshold for {', '.join(missing)}")
        if len(self.input_shape) != 3 or min(self.input_shape) <= 0:
            raise EngineError(f"engine manifest: input_shape {self.input_shape} is not (C, H, W)")
        if not self.class_names:
            raise EngineError("engine manifest: class_names is empty")
        if self.label_source not in ("reformed", "auto"):
            raise EngineError(f"engine manifest: label_source {self.label_source!r} is not 'reformed' or 'auto'")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["class_names"] = list(self.class_names)
        return {"format": d.pop("format"), "format_version": d.pop("format_version"), **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineManifest:
        fmt = d.get("format")
        if fmt != ENGINE_FORMAT:
            raise EngineError(f"not an ism-edge engine manifest (format {fmt!r}, expected {ENGINE_FORMAT!r})")
        ver = d.get("format_version")
        if ver != ENGINE_FORMAT_VERSION:
            raise EngineError(
                f"engine manifest format version {ver!r} is not supported by this ism-edge "
                f"(expects {ENGINE_FORMAT_VERSION}): rebuild the engines with 'ism-edge build'"
            )
        try:
            return cls(
                backend=str(d["backend"]),
                precision=str(d["precision"]),
                input_shape=tuple(int(v) for v in d["input_shape"]),  # type: ignore[arg-type]
                class_names=tuple(str(c) for c in d["class_names"]),
                thresholds={k: float(v) for k, v in d["thresholds"].items()},
                temperatures={k: float(v) for k, v in d["temperatures"].items()},
                target_fpr=float(d["target_fpr"]),
                batch={k: int(v) for k, v in d["batch"].items()},
                engines={k: EngineFile.from_dict(v) for k, v in d["engines"].items()},
                bundle_sha256=str(d["bundle_sha256"]),
                bundle_name=str(d.get("bundle_name", "")),
                color_order=str(d.get("color_order", "RGB")),
                feedback_rounds=int(d.get("feedback_rounds", 0)),
                label_source=str(d.get("label_source", "auto")),
                versions={k: str(v) for k, v in d.get("versions", {}).items()},
                gpu=d.get("gpu"),
                parity=d.get("parity", {}),
                created=str(d.get("created", "")),
                calibration=dict(d.get("calibration") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"engine manifest is missing or has a malformed field: {e}") from None

    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory) / MANIFEST_NAME
        atomic_write_json(path, self.to_dict())
        return path


def load_manifest(directory: str | os.PathLike[str], *, verify_files: bool = True) -> EngineManifest:
    """Read and validate ``DIR/manifest.json``; with ``verify_files`` check every engine's hash.

    Raises :class:`EngineError` with a one-line message naming the file and the fix.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise EngineError(f"engine directory {directory} does not exist: build it with 'ism-edge build BUNDLE --out {directory}'")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise EngineError(f"{path} is missing: {directory} is not an engine directory (build one with 'ism-edge build')")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineError(f"{path} is not valid JSON ({e}): rebuild the engines with 'ism-edge build'") from None
    if not isinstance(raw, dict):
        raise EngineError(f"{path} is not a JSON object: rebuild the engines with 'ism-edge build'")
    manifest = EngineManifest.from_dict(raw)
    if verify_files:
        for role, ef in manifest.engines.items():
            f = directory / ef.file
            if not f.is_file():
                raise EngineError(f"{f} ({role}) is missing: rebuild the engines with 'ism-edge build'")
            if sha256_file(f) != ef.sha256:
                raise EngineError(
                    f"{f} ({role}) does not match the hash in {path} (corrupted or tampered with): "
                    "rebuild the engines with 'ism-edge build'"
                )
    return manifest
