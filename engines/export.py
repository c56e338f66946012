"""Bundle → ONNX: the three deployed graphs with a dynamic batch axis ``N``, checked against
PyTorch (docs/engines.md).

:func:`export_bundle` (``ism-edge export``) writes them, FP32 and FP16, with a parity report;
:func:`exported` is the opening it shares with :func:`ism_edge_engines.build.build_engines`: load the
bundle, read the parity samples, export the graphs into a temporary directory and check them.

Graph roles and I/O names are the contract of :mod:`ism_edge.manifest`:

* ``mapper``: ``x`` → ``x_hat`` = M(x), ``recon_error`` = mean |x − x̂| per sample (MagNet's
  reconstruction detector, ``ism_edge_training.models.reconstruction_error``);
* ``classifier``: ``x`` → ``logits`` of the deployed classifier (temperature 1);
* ``perturbation``: ``x``, ``x_hat`` → ``p_score`` = sigmoid(P(x − x̂)); the residual is computed
  inside the graph, so the runtime needs no torch and no extra residual graph.

All inputs are float32 NCHW pixels in [0, 1]. Exported with the torch.export-based ("dynamo")
exporter at opset 18: it is torch 2.13's default and maintained path (the TorchScript exporter is
deprecated), it names the batch dimension from ``torch.export.Dim`` and emits no ``Constant``
nodes or shape-arithmetic chains, and TensorRT 10 parses opset 18.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ism_edge._io import atomic_directory, sha256_file
from ism_edge.errors import BundleError, EngineError, caused_by_interrupt, missing_dependency
from ism_edge.manifest import GRAPH_IO, ROLES, SCORE_NAMES, EngineFile, TensorSpec
from ism_edge_engines.artifacts import EXPORT_REPORT, check_out_dir, library_versions, now
from ism_edge_engines.progress import StepCallback, Steps

if TYPE_CHECKING:
    import numpy as np
    import onnx
    from torch import nn

    from ism_edge_training.bundle import DefenseBundle

OPSET = 18
PARITY_SAMPLES = 256
PARITY_BATCH = 64
BATCH_DIM = "N"


def tensor_specs(
    role: str, input_shape: tuple[int, int, int], num_classes: int
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Input and output specs of a role's graph (``-1`` is the dynamic batch axis)."""
    image = (-1, *input_shape)
    shapes = {"x": image, "x_hat": image, "recon_error": (-1,), "logits": (-1, num_classes), "p_score": (-1,)}
    ins, outs = GRAPH_IO[role]
    return tuple(TensorSpec(n, shapes[n]) for n in ins), tuple(TensorSpec(n, shapes[n]) for n in outs)


def engine_file(role: str, engine: Path, source: Path, root: Path, input_shape: tuple[int, int, int],
                num_classes: int) -> EngineFile:
    """A role's manifest entry: its engine file (hashed) and ONNX source under ``root``, and its graph I/O."""
    ins, outs = tensor_specs(role, input_shape, num_classes)
    return EngineFile(role=role, file=engine.relative_to(root).as_posix(), onnx=source.relative_to(root).as_posix(),
                      sha256=sha256_file(engine), inputs=ins, outputs=outs)


def graph_modules(bundle: DefenseBundle) -> dict[str, nn.Module]:
    """The bundle's networks wrapped with the exact inputs and outputs of each ONNX graph."""
    import torch
    from torch import nn

    from ism_edge_training.models import reconstruction_error

    class MapperGraph(nn.Module):
        def __init__(self, mapper: nn.Module) -> None:
            super().__init__()
            self.mapper = mapper

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x_hat = self.mapper(x)
            return x_hat, reconstruction_error(x, x_hat)

    class PerturbationGraph(nn.Module):
        def __init__(self, perturbation: nn.Module) -> None:
            super().__init__()
            self.perturbation = perturbation

        def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.perturbation(x - x_hat))

    graphs: dict[str, nn.Module] = {
        "mapper": MapperGraph(bundle.mapper),
        "classifier": bundle.classifier,
        "perturbation": PerturbationGraph(bundle.perturbation),
    }
    return {role: g.eval() for role, g in graphs.items()}


@contextlib.contextmanager
def _interrupts_stay_interrupts() -> Iterator[None]:
    """Ctrl-C during ``torch.onnx.export`` stays a KeyboardInterrupt.

    The exporter catches what its capture strategies raise; a KeyboardInterrupt that breaks one of
    them mid-step surfaces as the next strategy's error, wrapped in a TorchExportError "Failed to
    export the model" with 120+ lines of report; the interrupt is still in the error's chain.
    """
    try:
        yield
    except Exception as e:
        if caused_by_interrupt(e):
            raise KeyboardInterrupt from None
        raise


def onnx_from_module(
    module: nn.Module,
    role: str,
    path: str | os.PathLike[str],
    input_shape: tuple[int, int, int],
    *,
    opset: int = OPSET,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export one graph to ``path`` with a dynamic batch axis and check it (``onnx.checker``)."""
    try:
        import onnx
        import torch
    except ImportError as e:
        raise missing_dependency(e.name or "onnx", "train", "exporting ONNX graphs") from None

    from ism_edge_training.models.external import quiet_exporter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ins, outs = GRAPH_IO[role]
    example = tuple(torch.rand(2, *input_shape) for _ in ins)
    n = torch.export.Dim(BATCH_DIM, min=1)
    with torch.no_grad(), quiet_exporter(), _interrupts_stay_interrupts():
        program = torch.onnx.export(
            module,
            example,
            input_names=list(ins),
            output_names=list(outs),
            dynamic_shapes={name: {0: n} for name in _forward_arg_names(module, len(ins))},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    if program is None:  # pragma: no cover - the dynamo exporter always returns a program
        raise EngineError(f"torch.onnx.export returned no program for the {role} graph")
    model = program.model_proto
    for key, value in {"ism_edge.role": role, **(metadata or {})}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    check_onnx(path, role)
    return path


def _forward_arg_names(module: nn.Module, n: int) -> list[str]:
    import inspect

    return list(inspect.signature(module.forward).parameters)[:n]


def check_onnx(path: str | os.PathLike[str], role: str | None = None) -> onnx.ModelProto:
    """Load an ONNX file, run ``onnx.checker`` (full check) and verify the role's I/O contract.

    Raises :class:`EngineError` naming the file when it is unreadable, invalid or has the wrong
    inputs/outputs or no dynamic batch axis.
    """
    try:
        import onnx
    except ImportError:
        raise missing_dependency("onnx", "train", "checking ONNX graphs") from None

    path = Path(path)
    fix = "re-export it with 'ism-edge export' or rebuild with 'ism-edge build'"
    if not path.is_file():
        raise EngineError(f"{path} is missing: {fix}")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # onnx raises DecodeError, ValidationError, InferenceError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EngineError(f"{path} is not a valid ONNX model ({first}): {fix}") from None
    if role is not None:
        want_in, want_out = GRAPH_IO[role]
        got_in = tuple(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
        got_out = tuple(o.name for o in model.graph.output)
        if got_in != want_in or got_out != want_out:
            raise EngineError(
                f"{path} has inputs {got_in} and outputs {got_out}; the {role} graph must have "
                f"inputs {want_in} and outputs {want_out}: {fix}"
            )
        for value in (*model.graph.input, *model.graph.output):
            dims = value.type.tensor_type.shape.dim
            if not dims or dims[0].dim_param != BATCH_DIM:
                raise EngineError(f"{path}: tensor {value.name!r} has no dynamic batch axis {BATCH_DIM!r}: {fix}")
    return model


def save_pass_output(model: onnx.ModelProto, dst: Path, *, src: Path, what: str, tag: tuple[str, str]) -> Path:
    """Tag ``model`` (a metadata entry ``tag``), re-infer its shapes, check it (``onnx.checker``,
    full) and save it to ``dst``; for the graph passes (FP16, sub-pixel) that rewrite ``src``.

    A graph that fails the check is a bug in the pass (``what``), reported in one line.
    """
    import onnx

    meta = model.metadata_props.add()
    meta.key, meta.value = tag
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # pragma: no cover - a bug in the pass, not a user error
        raise EngineError(f"{what} of {src} produced an invalid graph: {str(e).splitlines()[0]}") from None
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def onnx_from_bundle(
    bundle: DefenseBundle,
    out_dir: str | os.PathLike[str],
    *,
    opset: int = OPSET,
    metadata: dict[str, str] | None = None,
    on_step: Any = None,
) -> dict[str, Path]:
    """Export the mapper, classifier and perturbation graphs of ``bundle`` to ``out_dir/{role}.onnx``.

    ``on_step(role)`` is called before each export (for progress reporting).
    """
    input_shape = bundle.input_shape
    modules = graph_modules(bundle)
    paths: dict[str, Path] = {}
    for role in ROLES:
        if on_step is not None:
            on_step(role)
        if role == "classifier" and bundle.external:
            paths[role] = onnx_of_user_classifier(bundle, Path(out_dir) / f"{role}.onnx", metadata=metadata)
            continue
        paths[role] = onnx_from_module(
            modules[role], role, Path(out_dir) / f"{role}.onnx", input_shape, opset=opset, metadata=metadata
        )
    return paths


def onnx_of_user_classifier(bundle: DefenseBundle, path: Path, *, metadata: dict[str, str] | None = None) -> Path:
    """Write the classifier graph of a bundle around a user's own classifier: the user's graph as it is,
    behind the conversion to its input contract (``ism_edge_training.models.external.classifier_graph``),
    never a re-export of the PyTorch conversion; checked like an exported graph."""
    import onnx

    from ism_edge_training.models.external import classifier_graph

    clf = bundle.classifier
    model = classifier_graph(onnx.ModelProto.FromString(clf.graph), clf.contract, clf.num_classes)
    for key, value in {"ism_edge.role": "classifier", "ism_edge.classifier_origin": clf.record["origin"]["kind"],
                       **(metadata or {})}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    check_onnx(path, "classifier")
    return path


# -- export with the parity gate --------------------------------------------------------------


def load_deployable(bundle_dir: Path) -> DefenseBundle:
    """Load a bundle of the full defense; evaluation baselines (``--baseline``) are refused.

    The engines and the runtime implement the full chain (M, C, P, three detectors); a baseline
    bundle lacks networks or deploys fewer detectors, so compiling it would change what it means.
    """
    from ism_edge_training.bundle import DefenseBundle, DefenseSpec

    bundle = DefenseBundle.load(bundle_dir)
    bundle.refuse_untrained(bundle_dir, "compiled")
    if bundle.defense != DefenseSpec():
        raise BundleError(f"{bundle_dir} is the evaluation baseline {bundle.defense.baseline!r}, not the full "
                          "defense: only full-defense bundles (ism-edge train without --baseline) can be compiled")
    return bundle


def export_graphs(
    bundle: DefenseBundle, onnx_dir: Path, steps: Steps, *, metadata: dict[str, str]
) -> dict[str, dict[str, Path]]:
    """Export the FP32 graphs to ``onnx_dir`` and convert each to FP16; ``{precision: {role: path}}``."""
    from ism_edge_engines.fp16 import fp16_from_onnx

    input_shape = bundle.input_shape
    modules = graph_modules(bundle)
    paths: dict[str, dict[str, Path]] = {"fp32": {}, "fp16": {}}
    for role in ROLES:
        if role == "classifier" and bundle.external:
            with steps("write the user's classifier graph"):
                paths["fp32"][role] = onnx_of_user_classifier(bundle, onnx_dir / f"{role}.onnx", metadata=metadata)
            continue
        with steps(f"export {role} to ONNX"):
            paths["fp32"][role] = onnx_from_module(modules[role], role, onnx_dir / f"{role}.onnx", input_shape,
                                                   metadata=metadata)
    for role in ROLES:
        with steps(f"convert {role} to FP16"):
            paths["fp16"][role] = fp16_from_onnx(paths["fp32"][role], onnx_dir / f"{role}.fp16.onnx")
    return paths


@dataclass(frozen=True)
class Exported:
    """A bundle's graphs exported into ``root`` (the temporary output directory) and checked.

    ``graphs``: ``{"fp32" | "fp16": {role: path}}``; ``x``: the parity samples (float32 NCHW
    pixels in [0, 1]) from ``sample_source``; ``reference`` and ``torch_defense``: PyTorch's graph
    outputs and defense decisions on them; ``report``: the samples, tolerances and the parity of
    the FP32 and FP16 graphs (``report["fp32"]``, ``report["fp16"]``), not yet gated.
    """

    bundle: DefenseBundle
    bundle_sha256: str
    root: Path
    graphs: dict[str, dict[str, Path]]
    x: np.ndarray
    sample_source: str
    reference: Mapping[str, Mapping[str, np.ndarray]]
    torch_defense: Mapping[str, np.ndarray]
    report: dict[str, Any]
    parity_batch: int = PARITY_BATCH

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.bundle.input_shape


@contextlib.contextmanager
def exported(
    bundle_dir: Path,
    out_dir: Path,
    steps: Steps,
    *,
    parity_samples: int,
    onnx_dir: str = "",
    calibrated: bool = False,
) -> Iterator[Exported]:
    """Export a bundle's graphs into a temporary directory that replaces ``out_dir`` when the
    ``with`` block ends without an error, and measure their parity against PyTorch.

    The graphs go to ``onnx_dir`` inside it. ``calibrated`` refuses a bundle without calibrated
    thresholds (engines need them). The caller gates on the report
    (:func:`ism_edge_engines.parity.raise_on_failure`) and adds its own files to ``root``.
    """
    from ism_edge.compat import bundle_sha256
    from ism_edge_engines import parity
    from ism_edge_engines.ort_build import parity_of_files
    from ism_edge_engines.samples import real_samples

    with steps("load bundle"):
        bundle = load_deployable(bundle_dir)
        missing = [s for s in SCORE_NAMES if s not in bundle.thresholds]
        if calibrated and missing:
            raise BundleError(
                f"bundle {bundle_dir} has no calibrated threshold for {', '.join(missing)}: run the "
                "'calibrate' stage of 'ism-edge train' on it before building engines"
            )
        digest = bundle_sha256(bundle_dir)
    input_shape = bundle.input_shape
    with steps("read parity samples"):
        x, sample_source = real_samples(input_shape, parity_samples, split="test")
    with atomic_directory(out_dir) as tmp:
        graphs = export_graphs(bundle, tmp / onnx_dir, steps, metadata={"ism_edge.bundle_sha256": digest})
        with steps("PyTorch reference outputs"):
            reference = parity.reference_outputs(bundle, x, PARITY_BATCH)
            torch_defense = parity.torch_defense_outputs(bundle, x, PARITY_BATCH)
        report: dict[str, Any] = {
            "samples": {"n": int(len(x)), "source": sample_source},
            "tolerances": parity.tolerances_dict(),
        }
        for prec in ("fp32", "fp16"):
            with steps(f"parity of the {prec.upper()} graphs"):
                report[prec] = parity_of_files(graphs[prec], tmp, prec, bundle, x, reference, torch_defense,
                                               PARITY_BATCH)
        yield Exported(bundle=bundle, bundle_sha256=digest, root=tmp, graphs=graphs, x=x, sample_source=sample_source,
                       reference=reference, torch_defense=torch_defense, report=report)


def export_bundle(
    bundle_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    parity_samples: int = PARITY_SAMPLES,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    """Export a bundle's three graphs (FP32 and FP16) to ``out_dir`` and gate both on parity.

    Writes ``{role}.onnx``, ``{role}.fp16.onnx`` and ``export.json`` (the parity report, bundle
    hash and library versions) atomically; returns the report. Raises
    :class:`ism_edge.errors.ParityError` naming the first graph outside tolerance.
    """
    from ism_edge._io import atomic_write_json
    from ism_edge_engines import parity

    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    check_out_dir(out_dir, bundle_dir, marker=EXPORT_REPORT)
    steps = Steps(on_step)
    versions = library_versions("onnxruntime", opset=OPSET)
    with exported(bundle_dir, out_dir, steps, parity_samples=parity_samples) as ex:
        report: dict[str, Any] = {
            "bundle_sha256": ex.bundle_sha256,
            "bundle_name": bundle_dir.resolve().name,
            "input_shape": list(ex.input_shape),
            **ex.report,
        }
        report["gated"] = ["fp32", "fp16"]
        report["ok"] = report["fp32"]["ok"] and report["fp16"]["ok"]
        report["versions"] = versions
        report["created"] = now()
        for prec in ("fp32", "fp16"):
            parity.raise_on_failure(report[prec], prec.upper(), ex.sample_source)
        atomic_write_json(ex.root / EXPORT_REPORT, report)
    steps.done()
    return report
