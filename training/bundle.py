"""The defense bundle: every network's weights (safetensors, no pickle) plus a JSON manifest.

The single artifact that export and evaluation consume (docs/architecture.md, "The defense chain"). Layout::

    BUNDLE/
      manifest.json            config, class names, temperatures, thresholds, provenance, versions
      classifier.safetensors   deployed (student) classifier C
      mapper.safetensors       instance sparsity mapping network M
      perturbation.safetensors perturbation classifier P
      discriminator.safetensors, teacher.safetensors   (kept for fine-tuning; optional)
      undefended.safetensors   plain classifier: the oblivious threat model's source (optional)

The manifest's ``defense`` field says which parts of the defense the bundle deploys (the
evaluation's baselines: no defense, MagNet, adversarial training alone, distillation alone, the
full defense); a manifest without it deploys the full defense. Networks a bundle does not deploy
need not be in it.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ism_edge import _checks as check
from ism_edge._io import _public_mode, atomic_directory, atomic_write_json, sha256_file
from ism_edge.errors import BundleError
from ism_edge.manifest import (
    DEFAULT_DETECTOR_TEMPERATURE,
    LABEL_SOURCES,
    MAX_CLASSES,
    MAX_FEEDBACK_ROUNDS,
    MAX_SIDE,
    MAX_THRESHOLD,
    SCORE_NAMES,
    TEMPERATURE_RANGE,
)
from ism_edge_training.models import (
    Classifier,
    Discriminator,
    MappingNetwork,
    ModelConfig,
    PerturbationClassifier,
)

BUNDLE_FORMAT = "ism-edge-bundle"
EXTERNAL_FILE = "classifier.onnx"  # a user's own classifier's graph (ism-edge train --classifier)
BUNDLE_FORMAT_VERSION = 1
REQUIRED = ("classifier", "mapper", "perturbation")  # of the full defense; see DefenseSpec.required_networks
OPTIONAL = ("discriminator", "teacher", "undefended")
DEFAULT_TEMPERATURES = {"train": 20.0, "deploy": 1.0, "detector": DEFAULT_DETECTOR_TEMPERATURE}
SCORES = SCORE_NAMES
BASELINES = ("none", "magnet", "adv-only", "distill-only", "full")
#: How a bundle stores its floating-point weights: float16 halves a shipped bundle; the networks
#: are built and trained in float32 either way (loading casts up).
WEIGHTS_DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: Largest layer sizes a bundle's model config may ask for (the presets stay far below).
MAX_WIDTH = 4096
MAX_DENSE = 65536


@dataclass(frozen=True)
class DefenseSpec:
    """Which parts of the defense a bundle deploys (its manifest's ``defense`` field).

    ``reformer``: the label is argmax C(x̂) with x̂ = M(x) (else argmax C(x)); ``detectors``: the
    scores (a subset of :data:`SCORES`) that can flag an input; the others never flag.
    ``baseline`` names the recipe that trained it (one of :data:`BASELINES`, or ``"custom"``).
    The default is the full defense, which is what a manifest without the field means.
    """

    baseline: str = "full"
    reformer: bool = True
    detectors: tuple[str, ...] = SCORES

    def __post_init__(self) -> None:
        if self.baseline not in (*BASELINES, "custom"):
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)} or custom, got {self.baseline!r}")
        if not isinstance(self.reformer, bool):
            raise ValueError(f"reformer must be true or false, got {self.reformer!r}")
        bad = [d for d in self.detectors if d not in SCORES]
        if bad or len(set(self.detectors)) != len(self.detectors):
            raise ValueError(f"detectors must be distinct entries of {', '.join(SCORES)}, got {list(self.detectors)}")
        object.__setattr__(self, "detectors", tuple(s for s in SCORES if s in self.detectors))

    @classmethod
    def for_baseline(cls, name: str) -> DefenseSpec:
        """The deployed parts of a named baseline (see ``ism_edge_training.recipe.config.BASELINE_HELP``)."""
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}: choose one of {', '.join(BASELINES)}")
        if name == "full":
            return cls()
        if name == "magnet":
            return cls("magnet", True, ("recon_error", "jsd"))
        return cls(name, False, ())

    @property
    def needs_mapper(self) -> bool:
        return self.reformer or "recon_error" in self.detectors or "jsd" in self.detectors

    @property
    def needs_perturbation(self) -> bool:
        return "p_score" in self.detectors

    def required_networks(self) -> tuple[str, ...]:
        """Networks a bundle with this spec must hold."""
        return (("classifier",) + (("mapper",) if self.needs_mapper else ())
                + (("perturbation",) if self.needs_perturbation else ()))

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "reformer": self.reformer, "detectors": list(self.detectors)}

    @classmethod
    def from_dict(cls, d: Any) -> DefenseSpec:
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"expected an object with baseline, reformer and detectors, got {type(d).__name__}")
        return cls(baseline=str(d.get("baseline", "custom")), reformer=d.get("reformer", True),
                   detectors=tuple(d.get("detectors", SCORES)))


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produced an artifact (recorded in every manifest)."""
    import numpy

    import ism_edge

    v = {"ism_edge": ism_edge.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
         "python": platform.python_version()}
    try:
        import safetensors

        v["safetensors"] = safetensors.__version__
    except ImportError:  # pragma: no cover - safetensors is a [train] dependency
        pass
    return v


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


NETWORKS: dict[str, type[nn.Module]] = {
    "classifier": Classifier,
    "mapper": MappingNetwork,
    "perturbation": PerturbationClassifier,
    "discriminator": Discriminator,
    "teacher": Classifier,
    "undefended": Classifier,
}


def build_networks(cfg: ModelConfig) -> dict[str, nn.Module]:
    """Fresh, untrained networks for ``cfg``."""
    return {name: cls(cfg) for name, cls in NETWORKS.items()}  # type: ignore[call-arg]


def network(name: str, cfg: ModelConfig, input_hw: tuple[int, int] | None = None) -> nn.Module:
    """A fresh network ``name``; ``input_hw``: the (height, width) of a user's classifier's input, which
    the mapping network pads to its own size (:class:`~training.models.padded.PaddedMappingNetwork`)."""
    if name == "mapper" and input_hw is not None and input_hw != (cfg.image_size, cfg.image_size):
        from ism_edge_training.models.padded import PaddedMappingNetwork

        return PaddedMappingNetwork(cfg, *input_hw)
    return NETWORKS[name](cfg)  # type: ignore[call-arg]


def external_networks(cfg: ModelConfig, classifier: nn.Module, input_hw: tuple[int, int]) -> dict[str, nn.Module]:
    """The networks of a bundle around a user's ``classifier``: it, and fresh M, P and D."""
    return {"classifier": classifier,
            **{n: network(n, cfg, input_hw) for n in ("mapper", "perturbation", "discriminator")}}


@dataclass
class DefenseBundle:
    """In-memory defense bundle; ``save``/``load`` round-trip it through a directory."""

    config: ModelConfig
    networks: dict[str, nn.Module]
    class_names: tuple[str, ...]
    preset: str = "custom"
    temperatures: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TEMPERATURES))
    thresholds: dict[str, float] = field(default_factory=dict)
    target_fpr: float = 0.01
    feedback_rounds: int = 0
    # "auto": C(x̂) only if flagged, else C(x) (the paper's conclusion); "reformed": always C(x̂)
    label_source: str = "auto"
    calibration: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, Any] = field(default_factory=dict)  # per-stage metrics and status
    defense: DefenseSpec = field(default_factory=DefenseSpec)  # which parts are deployed
    weights_dtype: str = "float32"  # how save() stores floating-point tensors (WEIGHTS_DTYPES)
    # a user's own classifier (ism-edge train --classifier): its origin and input contract, and the
    # (height, width) the defense works at; empty for the bundle's own classifier
    classifier_record: dict[str, Any] = field(default_factory=dict)
    # deployed networks saved as untrained stand-ins (the format needs them) by a training run of
    # only the stages before theirs; the runner fills them, build and evaluate refuse them
    untrained: tuple[str, ...] = ()

    @classmethod
    def create(cls, cfg: ModelConfig, class_names: tuple[str, ...] | list[str],
               preset: str = "custom") -> DefenseBundle:
        if len(class_names) != cfg.num_classes:
            raise ValueError(f"{len(class_names)} class names for num_classes={cfg.num_classes}")
        return cls(config=cfg, networks=build_networks(cfg), class_names=tuple(class_names), preset=preset)

    # -- convenient typed access ------------------------------------------------------------
    @property
    def classifier(self) -> Classifier:
        return self.networks["classifier"]  # type: ignore[return-value]

    @property
    def mapper(self) -> MappingNetwork:
        return self.networks["mapper"]  # type: ignore[return-value]

    @property
    def perturbation(self) -> PerturbationClassifier:
        return self.networks["perturbation"]  # type: ignore[return-value]

    @property
    def external(self) -> bool:
        """The classifier is a user's own (``ism-edge train --classifier``), kept as its ONNX graph."""
        return bool(self.classifier_record)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the defense's input: float32 RGB pixels in [0, 1] (a user's classifier's input
        size; else the model config's square size)."""
        if self.classifier_record:
            contract = self.classifier_record["input"]
            return (3, int(contract["height"]), int(contract["width"]))
        return (self.config.channels, self.config.image_size, self.config.image_size)

    @property
    def calibrated(self) -> bool:
        """Every deployed detector has a threshold (vacuously true for a bundle without detectors)."""
        return all(s in self.thresholds for s in self.defense.detectors)

    def deployed_only(self) -> DefenseBundle:
        """This bundle with only the networks its defense deploys (what ships; see ``scripts/ship_bundle.py``):
        no teacher, discriminator or undefended classifier."""
        return replace(self, networks={n: self.networks[n] for n in self.defense.required_networks()})

    def to(self, device: torch.device | str) -> DefenseBundle:
        for m in self.networks.values():
            m.to(device)
        return self

    def eval(self) -> DefenseBundle:
        for m in self.networks.values():
            m.eval()
        return self

    def manifest(self) -> dict[str, Any]:
        c, h, w = self.input_shape
        return {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "created": _now(),
            "preset": self.preset,
            "config": self.config.to_dict(),
            "input": {"channels": c, "height": h, "width": w, "range": [0.0, 1.0], "layout": "NCHW",
                      "color_order": "RGB"},
            **({"classifier": dict(self.classifier_record)} if self.classifier_record else {}),
            "class_names": list(self.class_names),
            "temperatures": dict(self.temperatures),
            "thresholds": dict(self.thresholds),
            "target_fpr": self.target_fpr,
            "feedback_rounds": self.feedback_rounds,
            "label_source": self.label_source,
            "weights_dtype": self.weights_dtype,
            "defense": self.defense.to_dict(),
            "calibration": self.calibration,
            "stages": self.stages,
            **({"untrained": sorted(self.untrained)} if self.untrained else {}),
            "provenance": self.provenance,
            "versions": library_versions(),
            "weights": {},
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the bundle atomically (temporary directory + rename); returns its path."""
        from safetensors.torch import save_file

        directory = Path(directory)
        manifest = self.manifest()
        dtype = WEIGHTS_DTYPES[self.weights_dtype]
        with atomic_directory(directory) as tmp:
            for name, net in self.networks.items():
                graph = getattr(net, "graph", None)
                if name == "classifier" and isinstance(graph, bytes):  # a user's classifier: its ONNX graph
                    (tmp / EXTERNAL_FILE).write_bytes(graph)
                    manifest["classifier"].update(file=EXTERNAL_FILE, graph_sha256=sha256_file(tmp / EXTERNAL_FILE))
                    continue
                fname = f"{name}.safetensors"
                state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
                         for k, v in net.state_dict().items()}
                overflow = next((k for k, v in state.items()
                                 if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
                if overflow is not None:
                    raise ValueError(f"{name}.{overflow} has values that {self.weights_dtype} cannot hold: "
                                     "save the bundle with weights_dtype='float32'")
                save_file(state, str(tmp / fname), metadata={"network": name, "format": BUNDLE_FORMAT})
                _public_mode(tmp / fname)  # safetensors writes 0600; a bundle is shipped and shared like its manifest
                manifest["weights"][name] = {"file": fname, "sha256": sha256_file(tmp / fname)}
            atomic_write_json(tmp / "manifest.json", manifest)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, map_location: str = "cpu") -> DefenseBundle:
        """Load and verify a bundle; raises :class:`BundleError` with a one-line message.

        Every field of the manifest is checked (type, range, consistency) and every weight file
        must lie inside the bundle, match its hash and hold exactly the tensors, of exactly the
        shapes, that the model config implies, before any network is allocated.
        """
        directory = Path(directory)
        raw = read_bundle_manifest(directory)
        where = directory / "manifest.json"
        try:
            fields_ = _bundle_fields(raw)
            cfg = _model_config(raw["config"])
            if len(fields_["class_names"]) != cfg.num_classes:
                raise check.FieldError(f"class_names lists {len(fields_['class_names'])} names but config.num_classes "
                                       f"is {cfg.num_classes}")
            spec = DefenseSpec.from_dict(raw.get("defense"))
            record = _classifier_record(raw.get("classifier", {}), cfg)
        except check.FieldError as e:
            raise BundleError(
                f"{where} has a missing or malformed field: {e}: the bundle is corrupt; retrain it") from None
        except (TypeError, ValueError) as e:
            raise BundleError(
                f"{where} has an invalid model config or 'defense' field: {e}: retrain the bundle") from None
        weights = raw["weights"]
        hw = (int(record["input"]["height"]), int(record["input"]["width"])) if record else None
        missing = [n for n in spec.required_networks() if n not in weights and not (record and n == "classifier")]
        if missing:
            raise BundleError(
                f"{directory} has no weights for {', '.join(missing)}: it is incomplete; retrain or copy it again")
        with torch.device("meta"):  # the shapes the config implies, without allocating them
            expected = {name: {k: tuple(v.shape) for k, v in net.state_dict().items()}
                        for name, net in build_networks(cfg).items()}
        loaded: dict[str, nn.Module] = {}
        if record:
            loaded["classifier"] = _external_classifier(directory, record)
        for name, entry in weights.items():
            if name not in NETWORKS or (record and name in ("classifier", "teacher", "undefended")):
                continue
            state = _read_weights(directory, entry["file"], name, entry["sha256"], expected[name], map_location,
                                  WEIGHTS_DTYPES[fields_["weights_dtype"]])
            net = network(name, cfg, hw)
            try:
                net.load_state_dict(state)
            except RuntimeError as e:  # pragma: no cover - the header check above catches mismatches first
                detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
                raise BundleError(f"{directory / entry['file']} cannot be loaded into the {name} network: "
                                  f"{detail[:400]}") from None
            loaded[name] = net
        b = cls(config=cfg, networks=loaded, defense=spec, classifier_record=record, **fields_)
        stand_ins = sorted(set(b.untrained) - set(loaded))
        if stand_ins:
            raise BundleError(f"{where} lists {', '.join(stand_ins)} as untrained but holds no weights for "
                              "them: the bundle is corrupt; retrain it")
        return b.eval()

    def refuse_untrained(self, directory: str | os.PathLike[str], use: str) -> None:
        """Raise a one-line :class:`BundleError` when a network ``use`` needs is an untrained stand-in."""
        if self.untrained:
            raise BundleError(f"{directory} holds untrained {', '.join(self.untrained)} networks (a run of earlier "
                              f"stages only) and cannot be {use}: train its later stages, calibrate included "
                              "(ism-edge train --stages … --out on it)")


def _bundle_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The manifest's scalar fields, checked (raises :class:`~ism_edge._checks.FieldError`)."""
    names = check.array(raw["class_names"], "class_names", max_len=MAX_CLASSES)
    temperatures = check.obj(raw.get("temperatures", DEFAULT_TEMPERATURES), "temperatures")
    thresholds = check.obj(raw.get("thresholds", {}), "thresholds")
    unknown = sorted(set(thresholds) - set(SCORES))
    if unknown:
        raise check.FieldError(f"thresholds has unknown scores {unknown} (expected {', '.join(SCORES)})")
    return {
        "class_names": tuple(check.text(c, f"class_names[{i}]", max_len=256) for i, c in enumerate(names)),
        "preset": check.text(raw.get("preset", "custom"), "preset", max_len=64),
        "temperatures": {check.text(k, "temperatures key", max_len=64):
                         check.number(v, f"temperatures.{k}", *TEMPERATURE_RANGE)
                         for k, v in temperatures.items()},
        "thresholds": {k: check.number(v, f"thresholds.{k}", 0.0, MAX_THRESHOLD) for k, v in thresholds.items()},
        "target_fpr": check.number(raw.get("target_fpr", 0.01), "target_fpr", 0.0, 0.5, lo_open=True),
        "feedback_rounds": check.integer(raw.get("feedback_rounds", 0), "feedback_rounds", 0, MAX_FEEDBACK_ROUNDS),
        "label_source": check.choice(raw.get("label_source", "auto"), "label_source", LABEL_SOURCES),
        "weights_dtype": check.choice(raw.get("weights_dtype", "float32"), "weights_dtype", tuple(WEIGHTS_DTYPES)),
        "calibration": check.obj(raw.get("calibration", {}), "calibration"),
        "provenance": check.obj(raw.get("provenance", {}), "provenance"),
        "stages": check.obj(raw.get("stages", {}), "stages"),
        "untrained": tuple(sorted({check.choice(n, f"untrained[{i}]", tuple(NETWORKS))
                                   for i, n in enumerate(check.array(raw.get("untrained", []), "untrained",
                                                                     max_len=len(NETWORKS)))})),
    }


def _model_config(raw: Any) -> ModelConfig:
    """The manifest's model config, every size bounded before a network is built from it."""
    raw = check.obj(raw, "config")
    limits = {"image_size": MAX_SIDE, "num_classes": MAX_CLASSES, "clf_dense": MAX_DENSE, "clf_rank": MAX_DENSE,
              "latent_dim": MAX_DENSE, "sparsity_k": MAX_DENSE}
    defaults = {f.name: f.default for f in fields(ModelConfig)}
    for key, value in raw.items():
        default = defaults.get(key)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise check.FieldError(f"config.{key} must be true or false, got {check.show(value)}")
        elif isinstance(default, int):
            check.integer(value, f"config.{key}", 0 if key == "clf_rank" else 1, limits.get(key, MAX_WIDTH))
        elif isinstance(default, tuple):
            items = check.array(value, f"config.{key}", max_len=8)
            for i, v in enumerate(items):
                if isinstance(default[0], int):
                    check.integer(v, f"config.{key}[{i}]", 1, MAX_WIDTH)
                else:
                    check.number(v, f"config.{key}[{i}]", -1e3, 1e3)
            if isinstance(default[0], int) and len(items) != len(default):
                raise check.FieldError(f"config.{key} must list {len(default)} widths, got {len(items)}")
    return ModelConfig.from_dict(raw)


def _read_weights(directory: Path, file: str, name: str, digest: str, expected: dict[str, tuple[int, ...]],
                  map_location: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of one weight file, refused unless it lies inside the bundle, matches its hash,
    holds exactly the tensors and shapes ``expected``, stores floating-point values as ``dtype``
    (the manifest's ``weights_dtype``) and every value is finite; returned as float32."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        path = check.inside(directory, file)
    except check.FieldError as e:
        raise BundleError(f"{e}: the {name} weights must be a file of the bundle; retrain or copy it again") from None
    if not path.is_file():
        raise BundleError(f"{path} is missing: the bundle is incomplete; retrain or copy it again")
    if sha256_file(path) != digest:
        raise BundleError(
            f"{path} does not match its hash in manifest.json (corrupted or modified): retrain or copy it again")
    fix = f"the {name} weights do not fit the bundle's model config; retrain or copy the bundle again"
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{path} is not a readable safetensors file ({_first_line(e)}): "
                          "retrain or copy the bundle again") from None
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise BundleError(f"{path} has no tensor {missing[0]!r}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + f": {fix}")
    extra = [k for k in shapes if k not in expected]
    if extra:
        raise BundleError(f"{path} has an unexpected tensor {extra[0]!r}: {fix}")
    for k, shape in expected.items():
        if shapes[k] != shape:
            raise BundleError(
                f"{path}: tensor {k!r} has shape {list(shapes[k])}, the config needs {list(shape)}: {fix}")
    try:
        state = load_file(str(path), device=map_location)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise BundleError(f"{path} cannot be loaded into the {name} network: {_first_line(e)}") from None
    for k, t in state.items():
        if not t.is_floating_point():
            continue
        if t.dtype != dtype:
            raise BundleError(f"{path}: tensor {k!r} is {str(t.dtype).removeprefix('torch.')}, the manifest's "
                              f"weights_dtype says {str(dtype).removeprefix('torch.')}: "
                              "retrain or copy the bundle again")
        if not bool(torch.isfinite(t).all()):
            raise BundleError(f"{path}: tensor {k!r} holds NaN or infinite values: retrain or copy the bundle again")
        state[k] = t.float()
    return state


def _classifier_record(raw: Any, cfg: ModelConfig) -> dict[str, Any]:
    """The manifest's ``classifier`` record (a user's classifier), checked; ``{}`` for none."""
    from ism_edge.contract import check_classifier_record
    from ism_edge_training.models.padded import mapper_side

    record = check_classifier_record(raw)
    if not record:
        return {}
    check.relative_file(check.require(record, "file", "classifier.file"), "classifier.file")
    check.sha256(check.require(record, "graph_sha256", "classifier.graph_sha256"), "classifier.graph_sha256")
    n = check.integer(check.require(record, "num_classes", "classifier.num_classes"), "classifier.num_classes", 2,
                      MAX_CLASSES)
    if n != cfg.num_classes:
        raise check.FieldError(f"classifier.num_classes is {n} but config.num_classes is {cfg.num_classes}")
    h, w = record["input"]["height"], record["input"]["width"]
    if mapper_side(h, w) != cfg.image_size:
        raise check.FieldError(f"classifier.input is {h}x{w} but config.image_size is {cfg.image_size}, not "
                               f"{mapper_side(h, w)}")
    return record


def _external_classifier(directory: Path, record: dict[str, Any]) -> nn.Module:
    """The user's classifier of a bundle: its graph file, hash-checked, converted for PyTorch."""
    from ism_edge_training.models.external import from_bundle

    try:
        path = check.inside(directory, record["file"])
    except check.FieldError as e:
        raise BundleError(f"{e}: the classifier graph must be a file of the bundle; retrain or copy it again") from None
    if not path.is_file():
        raise BundleError(f"{path} is missing: the bundle is incomplete; retrain or copy it again")
    if sha256_file(path) != record["graph_sha256"]:
        raise BundleError(f"{path} does not match its hash in manifest.json (corrupted or modified): "
                          "retrain or copy it again")
    return from_bundle(path.read_bytes(), record, str(path))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def read_bundle_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``BUNDLE/manifest.json`` without loading weights (no torch work).

    The JSON is size- and depth-capped before parsing; ``weights`` must name, for each network, a
    plain file inside the bundle and its SHA-256. The other fields are checked by
    :meth:`DefenseBundle.load`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"bundle {directory} does not exist: train one with 'ism-edge train --out {directory}'")
    path = directory / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{path} is missing: {directory} is not a defense bundle")
    try:
        raw = check.read_json(path)
    except check.TooLargeError as e:
        raise BundleError(f"{path} is refused ({e}): the bundle is corrupt; retrain it") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}): the bundle is corrupt; retrain it") from None
    if not isinstance(raw, dict) or raw.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not an ism-edge defense bundle manifest")
    if raw.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{path} has bundle format version {check.show(raw.get('format_version'))}; this ism-edge reads "
            f"version {BUNDLE_FORMAT_VERSION}: retrain or use a matching ism-edge release"
        )
    for key in ("config", "class_names", "weights"):
        if key not in raw:
            raise BundleError(f"{path} has no {key!r} field: the bundle is corrupt; retrain it")
    try:
        for name, entry in check.obj(raw["weights"], "weights").items():
            entry = check.obj(entry, f"weights.{name}")
            check.relative_file(check.require(entry, "file", f"weights.{name}.file"), f"weights.{name}.file")
            check.sha256(check.require(entry, "sha256", f"weights.{name}.sha256"), f"weights.{name}.sha256")
    except check.FieldError as e:
        raise BundleError(f"{path} has a missing or malformed field: {e}: the bundle is corrupt; retrain it") from None
    return raw


def bundle_hash(directory: str | os.PathLike[str]) -> str:
    """Identity of a bundle: SHA-256 over its manifest and weight files (what engines record)."""
    from ism_edge.compat import bundle_sha256

    read_bundle_manifest(directory)
    return bundle_sha256(directory)
