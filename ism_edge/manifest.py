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

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ism_edge import _checks as check
from ism_edge._io import atomic_write_json, sha256_file
from ism_edge.errors import EngineError

ENGINE_FORMAT = "ism-edge-engines"
ENGINE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ROLES = ("mapper", "classifier", "perturbation")
BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
SCORE_NAMES = ("recon_error", "jsd", "p_score")
#: Graph inputs and outputs of each role, by name (the table above): what the backends wire.
GRAPH_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "mapper": (("x",), ("x_hat", "recon_error")),
    "classifier": (("x",), ("logits",)),
    "perturbation": (("x", "x_hat"), ("p_score",)),
}
#: Temperature of the JSD detector's softmaxes when a bundle or manifest names none (MagNet's T = 10).
DEFAULT_DETECTOR_TEMPERATURE = 10.0
COLOR_ORDERS = ("RGB", "BGR")
LABEL_SOURCES = ("auto", "reformed")
DTYPES = ("float32", "float16", "int8", "uint8", "int32", "int64", "bool")
CALIBRATION_MODES = ("resize", "tile")
#: Largest accepted values: they bound the loops and buffers a manifest can ask for.
MAX_FEEDBACK_ROUNDS = 100
MAX_BATCH = 4096
MAX_SIDE = 4096
MAX_CLASSES = 100_000
MAX_BATCH_ELEMENTS = 1 << 29  # max batch × C × H × W: 2 GiB of float32 per staging buffer
TEMPERATURE_RANGE = (1e-3, 1e4)
MAX_THRESHOLD = 1e6  # the scores are in [0, 1] (JSD in [0, ln 2]); a huge threshold turns a detector off
_WHAT = "engine manifest"
_FIX = "rebuild the engines with 'ism-edge build'"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``shape`` uses -1 for the dynamic batch axis."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def check(self, name: str) -> None:
        """Raise :class:`~ism_edge._checks.FieldError` (naming ``name``) unless this spec is well-formed."""
        check.text(self.name, f"{name}.name", max_len=64, empty=False)
        if not 1 <= len(self.shape) <= 8:
            raise check.FieldError(f"{name}.shape must have 1 to 8 dimensions, got {list(self.shape)}")
        for i, dim in enumerate(self.shape):
            check.integer(dim, f"{name}.shape[{i}]", -1, 1 << 24)
            if dim == 0:
                raise check.FieldError(f"{name}.shape[{i}] must be -1 (dynamic) or >= 1, got 0")
        check.choice(self.dtype, f"{name}.dtype", DTYPES)

    @classmethod
    def from_dict(cls, d: Any, name: str = "tensor") -> TensorSpec:
        d = check.obj(d, name)
        shape = check.array(check.require(d, "shape", f"{name}.shape"), f"{name}.shape", max_len=8)
        return cls(name=check.require(d, "name", f"{name}.name"), shape=tuple(shape), dtype=d.get("dtype", "float32"))


@dataclass(frozen=True)
class EngineFile:
    """One compiled network: ``file`` is what the backend loads, ``onnx`` the source it came from.

    ``inputs``/``outputs`` name the graph's tensors in :data:`GRAPH_IO` order; a backend refuses a
    loaded network whose I/O names differ from them.
    """

    role: str
    file: str
    onnx: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def check(self, name: str) -> None:
        """Raise :class:`~ism_edge._checks.FieldError` (naming ``name``) unless this entry is well-formed;
        ``file`` and ``onnx`` must be plain names inside the engine directory."""
        check.relative_file(self.file, f"{name}.file")
        check.relative_file(self.onnx, f"{name}.onnx")
        check.sha256(self.sha256, f"{name}.sha256")
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            if not 1 <= len(specs) <= 8:
                raise check.FieldError(f"{name}.{kind} must list 1 to 8 tensors, got {len(specs)}")
            for i, spec in enumerate(specs):
                spec.check(f"{name}.{kind}[{i}]")

    @classmethod
    def from_dict(cls, d: Any, name: str = "engine") -> EngineFile:
        d = check.obj(d, name)
        specs = {kind: check.array(check.require(d, kind, f"{name}.{kind}"), f"{name}.{kind}", max_len=8)
                 for kind in ("inputs", "outputs")}
        return cls(
            role=check.require(d, "role", f"{name}.role"),
            file=check.require(d, "file", f"{name}.file"),
            onnx=check.require(d, "onnx", f"{name}.onnx"),
            sha256=check.require(d, "sha256", f"{name}.sha256"),
            inputs=tuple(TensorSpec.from_dict(t, f"{name}.inputs[{i}]") for i, t in enumerate(specs["inputs"])),
            outputs=tuple(TensorSpec.from_dict(t, f"{name}.outputs[{i}]") for i, t in enumerate(specs["outputs"])),
        )


@dataclass(frozen=True)
class EngineManifest:
    """Everything the runtime needs to run an engine directory (docs/engines.md, "Engine directory")."""

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
    # a user's own classifier (ism-edge train --classifier): its origin and input contract
    # (ism_edge.contract), which the classifier graph converts the runtime's pixels to
    classifier: dict[str, Any] = field(default_factory=dict)
    format: str = ENGINE_FORMAT
    format_version: int = ENGINE_FORMAT_VERSION

    def __post_init__(self) -> None:
        """Every field in range and consistent (docs/architecture.md, "Expected failures"): a manifest
        is read from disk, where anyone may have edited it, and its numbers bound loops and buffers."""
        if self.backend not in BACKENDS:
            raise EngineError(f"{_WHAT}: backend {self.backend!r} is not one of {BACKENDS}")
        if self.precision not in PRECISIONS:
            raise EngineError(f"{_WHAT}: precision {self.precision!r} is not one of {PRECISIONS}")
        missing = [r for r in ROLES if r not in self.engines]
        if missing:
            raise EngineError(f"{_WHAT}: no engine for {', '.join(missing)}")
        missing = [s for s in SCORE_NAMES if s not in self.thresholds]
        if missing:
            raise EngineError(f"{_WHAT}: no threshold for {', '.join(missing)}")
        if self.label_source not in LABEL_SOURCES:
            raise EngineError(f"{_WHAT}: label_source {self.label_source!r} is not 'reformed' or 'auto'")
        try:
            self._check_fields()
        except check.FieldError as e:
            raise EngineError(f"{_WHAT} has a missing or malformed field: {e}: {_FIX}") from None

    def _check_fields(self) -> None:
        unknown = sorted(set(self.engines) - set(ROLES))
        if unknown:
            raise check.FieldError(f"engines has unknown roles {unknown} (expected {', '.join(ROLES)})")
        for role, ef in self.engines.items():
            if ef.role != role:
                raise check.FieldError(f"engines.{role}.role must be {role!r}, got {ef.role!r}")
            ef.check(f"engines.{role}")
            for kind, specs, want in (
                ("inputs", ef.inputs, GRAPH_IO[role][0]), ("outputs", ef.outputs, GRAPH_IO[role][1])
            ):
                if tuple(t.name for t in specs) != want:
                    raise check.FieldError(
                        f"engines.{role}.{kind} must name {list(want)}, got {[t.name for t in specs]}"
                    )
        unknown = sorted(set(self.thresholds) - set(SCORE_NAMES))
        if unknown:
            raise check.FieldError(f"thresholds has unknown scores {unknown} (expected {', '.join(SCORE_NAMES)})")
        thresholds = {k: check.number(v, f"thresholds.{k}", 0.0, MAX_THRESHOLD) for k, v in self.thresholds.items()}
        temperatures = {
            check.text(k, "temperatures key", max_len=64): check.number(v, f"temperatures.{k}", *TEMPERATURE_RANGE)
            for k, v in self.temperatures.items()
        }
        object.__setattr__(self, "thresholds", thresholds)
        object.__setattr__(self, "temperatures", temperatures)
        object.__setattr__(self, "target_fpr", check.number(self.target_fpr, "target_fpr", 0.0, 0.5, lo_open=True))
        if len(self.input_shape) != 3:
            raise check.FieldError(f"input_shape must be [C, H, W], got {list(self.input_shape)}")
        c, h, w = (check.integer(v, f"input_shape[{i}]", 1, MAX_SIDE) for i, v in enumerate(self.input_shape))
        if c not in (1, 3):
            raise check.FieldError(f"input_shape[0] (channels) must be 1 or 3, got {c}")
        if set(self.batch) != {"min", "opt", "max"}:
            raise check.FieldError(f"batch must have exactly min, opt and max, got {sorted(self.batch)}")
        lo, opt, hi = (check.integer(self.batch[k], f"batch.{k}", 1, MAX_BATCH) for k in ("min", "opt", "max"))
        if not lo <= opt <= hi:
            raise check.FieldError(f"batch must have min <= opt <= max, got min {lo}, opt {opt}, max {hi}")
        if hi * c * h * w > MAX_BATCH_ELEMENTS:
            raise check.FieldError(f"batch.max {hi} of {c}x{h}x{w} inputs needs more than "
                                   f"{MAX_BATCH_ELEMENTS * 4 >> 30} GiB per buffer")
        if not 1 <= len(self.class_names) <= MAX_CLASSES:
            raise check.FieldError(f"class_names must list 1 to {MAX_CLASSES} names, got {len(self.class_names)}")
        for i, name in enumerate(self.class_names):
            check.text(name, f"class_names[{i}]", max_len=256)
        check.sha256(self.bundle_sha256, "bundle_sha256")
        check.text(self.bundle_name, "bundle_name", max_len=255)
        check.choice(self.color_order, "color_order", COLOR_ORDERS)
        check.integer(self.feedback_rounds, "feedback_rounds", 0, MAX_FEEDBACK_ROUNDS)
        for k, v in check.obj(self.versions, "versions").items():
            check.text(k, "versions key", max_len=64)
            check.text(v, f"versions.{k}", max_len=128)
        if self.gpu is not None:
            gpu = check.obj(self.gpu, "gpu")
            check.text(check.require(gpu, "name", "gpu.name"), "gpu.name", max_len=256)
            check.text(check.require(gpu, "compute_capability", "gpu.compute_capability"), "gpu.compute_capability",
                       max_len=16)
        check.text(self.created, "created", max_len=64)
        sources = check.obj(check.obj(self.parity, "parity").get("sources", {}), "parity.sources")
        for name, digest in sources.items():
            check.relative_file(name, f"parity.sources key {name!r}")
            check.sha256(digest, f"parity.sources[{name!r}]")
        _check_calibration(check.obj(self.calibration, "calibration"))
        from ism_edge.contract import check_classifier_record

        record = check_classifier_record(self.classifier)
        if record:
            contract = record["input"]
            if (contract["height"], contract["width"]) != (h, w) or c != 3:
                raise check.FieldError(f"classifier.input is {contract['height']}x{contract['width']} but input_shape "
                                       f"is {list(self.input_shape)}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["class_names"] = list(self.class_names)
        return {"format": d.pop("format"), "format_version": d.pop("format_version"), **d}

    @classmethod
    def from_dict(cls, d: Any, *, where: str = _WHAT) -> EngineManifest:
        """Validate and convert a parsed manifest; ``where`` (the file) starts every error message."""
        if not isinstance(d, dict):
            raise EngineError(f"{where} is not a JSON object: {_FIX}")
        fmt = d.get("format")
        if fmt != ENGINE_FORMAT:
            raise EngineError(
                f"{where}: not an ism-edge engine manifest (format {check.show(fmt)}, expected {ENGINE_FORMAT!r})"
            )
        ver = d.get("format_version")
        if ver != ENGINE_FORMAT_VERSION:
            raise EngineError(
                f"{where}: engine manifest format version {check.show(ver)} is not supported by this ism-edge "
                f"(expects {ENGINE_FORMAT_VERSION}): {_FIX}"
            )
        try:
            req = {k: check.require(d, k, k) for k in ("backend", "precision", "input_shape", "class_names",
                                                       "thresholds", "temperatures", "target_fpr", "batch", "engines",
                                                       "bundle_sha256")}
            engines = check.obj(req["engines"], "engines")
            return cls(
                backend=req["backend"],
                precision=req["precision"],
                input_shape=tuple(check.array(req["input_shape"], "input_shape", max_len=8)),  # type: ignore[arg-type]
                class_names=tuple(check.array(req["class_names"], "class_names", max_len=MAX_CLASSES + 1)),
                thresholds=dict(check.obj(req["thresholds"], "thresholds")),
                temperatures=dict(check.obj(req["temperatures"], "temperatures")),
                target_fpr=req["target_fpr"],
                batch=dict(check.obj(req["batch"], "batch")),
                engines={k: EngineFile.from_dict(v, f"engines.{k}") for k, v in engines.items()},
                bundle_sha256=req["bundle_sha256"],
                bundle_name=d.get("bundle_name", ""),
                color_order=d.get("color_order", "RGB"),
                feedback_rounds=d.get("feedback_rounds", 0),
                label_source=d.get("label_source", "auto"),
                versions=dict(check.obj(d.get("versions", {}), "versions")),
                gpu=d.get("gpu"),
                parity=dict(check.obj(d.get("parity", {}), "parity")),
                created=d.get("created", ""),
                calibration=dict(check.obj(d.get("calibration") or {}, "calibration")),
                classifier=dict(check.obj(d.get("classifier") or {}, "classifier")),
            )
        except check.FieldError as e:
            raise EngineError(f"{where} has a missing or malformed field: {e}: {_FIX}") from None
        except EngineError as e:
            message = str(e)
            raise EngineError(where + message.removeprefix(_WHAT) if message.startswith(_WHAT) else message) from None

    def files(self) -> dict[str, str]:
        """Every file the manifest names, relative to its directory: ``{name: what it is}``."""
        named = {}
        for role, ef in self.engines.items():
            named[ef.file] = f"{role}"
            named.setdefault(ef.onnx, f"{role} source")
        for name in self.parity.get("sources", {}):
            named.setdefault(name, f"{Path(name).name.split('.')[0]} graph")
        return named

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
        raise EngineError(
            f"engine directory {directory} does not exist: build it with 'ism-edge build BUNDLE --out {directory}'"
        )
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise EngineError(
            f"{path} is missing: {directory} is not an engine directory (build one with 'ism-edge build')"
        )
    try:
        raw = check.read_json(path)
    except check.TooLargeError as e:
        raise EngineError(f"{path} is refused ({e}): {_FIX}") from None
    except (OSError, ValueError) as e:
        raise EngineError(f"{path} is not valid JSON ({e}): {_FIX}") from None
    manifest = EngineManifest.from_dict(raw, where=str(path))
    for name, what in manifest.files().items():
        try:
            check.inside(directory, name)
        except check.FieldError as e:
            raise EngineError(f"{e}: {path} names {name} ({what}), which must be a file of the engine directory; "
                              f"{_FIX}") from None
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


def _check_calibration(cal: dict[str, Any]) -> None:
    """The calibration record (``ism_edge.calibration``) that ``ism-edge run`` reports."""
    if not cal:
        return
    check.integer(check.require(cal, "frames", "calibration.frames"), "calibration.frames", 1, 1 << 40)
    check.text(check.require(cal, "source", "calibration.source"), "calibration.source", max_len=4096)
    check.number(check.require(cal, "target_fpr", "calibration.target_fpr"), "calibration.target_fpr", 0.0, 0.5,
                 lo_open=True)
    check.text(cal.get("created", ""), "calibration.created", max_len=64)
    check.choice(check.require(cal, "mode", "calibration.mode"), "calibration.mode", CALIBRATION_MODES)
    grid = cal.get("tile_grid")
    if grid is not None:
        if len(check.array(grid, "calibration.tile_grid", max_len=2)) != 2:
            raise check.FieldError(f"calibration.tile_grid must be [rows, cols], got {check.show(grid)}")
        for i, v in enumerate(grid):
            check.integer(v, f"calibration.tile_grid[{i}]", 1, 1024)
    for key in ("thresholds", "previous"):
        for k, v in check.obj(cal.get(key, {}), f"calibration.{key}").items():
            check.number(v, f"calibration.{key}.{k}", 0.0, MAX_THRESHOLD)
    for i, record in enumerate(check.array(cal.get("history", []), "calibration.history", max_len=100)):
        check.obj(record, f"calibration.history[{i}]")
