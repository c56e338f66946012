"""Numerical parity of exported graphs and built engines against the PyTorch defense (docs/engines.md, "Parity gate").

Two levels, both on real images (:func:`ism_edge_engines.samples.real_samples`):

* **graph**: each graph's outputs against the same PyTorch module on the same inputs (the
  perturbation graph gets PyTorch's x̂, so each graph's own error is measured): max and mean
  absolute error, and the classifier's label agreement;
* **defense**: the graph files run as the runtime runs them — its own backend (ONNX Runtime on
  the CPU, :func:`ism_edge.backends.select_backend`) and its own host half
  (:mod:`ism_edge.decision`: feedback rounds, JSD, flags, label) — against
  :class:`ism_edge_training.defense.Defense`: agreement of the label and of each detector flag.

Tolerances (per precision; ``scale`` is the largest |value| of that output in PyTorch, so logits
of any magnitude are judged relative to their range, while x̂, recon_error and p_score have
scale ≤ 1). The max bound applies per sample and must hold on at least the agreement share of the
samples; the mean bound applies over all of them:

=========  ==================================  ===================================  =========
precision  max |Δ| ≤                           mean |Δ| ≤                           agreement
=========  ==================================  ===================================  =========
fp32       1e-4 · (1 + scale)                  1e-5 · (1 + scale)                   ≥ 99.5 %
fp16       2e-2 · (1 + scale)                  2e-3 · (1 + scale)                   ≥ 99 %
int8       0.15 · (1 + scale)                  3e-2 · (1 + scale)                   ≥ 95 %
=========  ==================================  ===================================  =========

FP32 differences come from operation order only; FP16 keeps 11 significant bits (relative step
4.9e-4) through ~10 layers, and the k-sparse code can swap its k-th entry for an almost equal one,
hence the wider max bound and its per-sample share (docs/engines.md has the measured
differences); INT8 quantises the convolutions to
256 levels. Label/flag agreement is the share of samples whose decision matches PyTorch. Per
detector the report counts ``flips`` and, of those, ``borderline`` ones: the PyTorch score lay
within the precision's max-|Δ| bound of the threshold, so the tolerated error explains the flip.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ism_edge.errors import ParityError
from ism_edge.manifest import (
    GRAPH_IO,
    ROLES,
    SCORE_NAMES,
    EngineManifest,
)

if TYPE_CHECKING:
    from ism_edge_training.bundle import DefenseBundle

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
SCORES = SCORE_NAMES


@dataclass(frozen=True)
class Tolerance:
    """Parity bounds for one precision: |Δ| bounds scale with ``1 + scale`` of the output."""

    max_abs: float
    mean_abs: float
    agreement: float

    def __post_init__(self) -> None:
        if self.max_abs <= 0 or self.mean_abs <= 0:
            raise ValueError("tolerances must be > 0")
        if not 0.0 < self.agreement <= 1.0:
            raise ValueError(f"agreement must be in (0, 1], got {self.agreement}")


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs=1e-4, mean_abs=1e-5, agreement=0.995),
    "fp16": Tolerance(max_abs=2e-2, mean_abs=2e-3, agreement=0.99),
    "int8": Tolerance(max_abs=0.15, mean_abs=3e-2, agreement=0.95),
}


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def run_batched(run: Runner, feed: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """Call ``run`` on slices of at most ``batch`` samples and concatenate the outputs."""
    n = len(next(iter(feed.values())))
    parts = [run({k: np.ascontiguousarray(v[s]) for k, v in feed.items()}) for s in _batches(n, batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def reference_outputs(bundle: DefenseBundle, x: np.ndarray, batch: int = 64) -> dict[str, dict[str, np.ndarray]]:
    """PyTorch outputs of every graph module on ``x`` (float32 NCHW in [0, 1]), per role."""
    import torch

    from ism_edge_engines.export import graph_modules

    modules = graph_modules(bundle)

    def torch_runner(role: str) -> Runner:
        names = GRAPH_IO[role][1]

        def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            with torch.no_grad():
                out = modules[role](*(torch.from_numpy(v) for v in feed.values()))
            outs = out if isinstance(out, tuple) else (out,)
            return {k: o.numpy() for k, o in zip(names, outs, strict=True)}

        return run

    mapper = run_batched(torch_runner("mapper"), {"x": x}, batch)
    return {
        "mapper": mapper,
        "classifier": run_batched(torch_runner("classifier"), {"x": x}, batch),
        "perturbation": run_batched(torch_runner("perturbation"), {"x": x, "x_hat": mapper["x_hat"]}, batch),
    }


def graph_inputs(role: str, x: np.ndarray, reference: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The feed of a role's graph for parity: the samples, plus PyTorch's x̂ for the perturbation graph."""
    if role == "perturbation":
        return {"x": x, "x_hat": np.asarray(reference["mapper"]["x_hat"])}
    return {"x": x}


def compare_outputs(ours: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], tol: Tolerance) -> dict[str, Any]:
    """Per-output max/mean absolute error against ``ref`` with the bounds they were held to."""
    report: dict[str, Any] = {}
    for name, want in ref.items():
        got = np.asarray(ours[name], dtype=np.float64)
        want64 = np.asarray(want, dtype=np.float64)
        if got.shape != want64.shape:
            report[name] = {"ok": False, "error": f"shape {got.shape} != {want64.shape}"}
            continue
        diff = np.abs(got - want64)
        finite = bool(np.isfinite(got).all())
        scale = float(np.abs(want64).max()) if want64.size else 0.0
        max_abs = float(diff.max()) if diff.size else 0.0
        mean_abs = float(diff.mean()) if diff.size else 0.0
        limit_max = tol.max_abs * (1.0 + scale)
        limit_mean = tol.mean_abs * (1.0 + scale)
        # The max bound holds per sample, for the precision's agreement share of the samples: a
        # near-tie in the k-sparse top-k can select another entry in reduced precision and move
        # one sample's x̂ further than rounding alone would (the decisions are gated separately).
        per_sample = diff.reshape(diff.shape[0], -1).max(axis=1) if diff.ndim and diff.size else np.zeros(1)
        over = int(np.sum(per_sample > limit_max))
        report[name] = {
            "max_abs": max_abs,
            "mean_abs": mean_abs,
            "limit_max_abs": limit_max,
            "limit_mean_abs": limit_mean,
            "samples_over_max": over,
            "ok": finite and over <= (1.0 - tol.agreement) * len(per_sample) and mean_abs <= limit_mean,
        }
        if not finite:
            report[name]["error"] = "non-finite values"
    return report


def gate_manifest(files: Mapping[str, Path], root: Path, bundle: DefenseBundle, *, batch: int = 64) -> EngineManifest:
    """The manifest the parity gate runs ``files`` (one graph per role, under ``root``) with.

    An ONNX Runtime manifest that loads each file as it is, with the bundle's class names,
    thresholds, temperatures, feedback rounds and label source, as ``ism-edge build`` writes them.
    A threshold the bundle lacks (not yet calibrated) turns its detector off (the largest allowed
    threshold), as :func:`torch_defense_outputs` does; ``bundle_sha256`` is a placeholder.
    """
    from ism_edge_engines.artifacts import decision_fields
    from ism_edge_engines.export import engine_file

    cfg = bundle.config
    input_shape = bundle.input_shape
    return EngineManifest(
        backend="onnxruntime",
        precision="fp32",
        input_shape=input_shape,
        **decision_fields(bundle),
        batch={"min": 1, "opt": batch, "max": batch},
        engines={role: engine_file(role, Path(files[role]), Path(files[role]), root, input_shape, cfg.num_classes)
                 for role in ROLES},
        bundle_sha256="0" * 64,
    )


def runtime_defense_outputs(
    directory: str | Path, manifest: EngineManifest, x: np.ndarray, *, backend: str = "onnxruntime", device: str = "cpu"
) -> dict[str, np.ndarray]:
    """The runtime's decisions on ``x`` (float32 NCHW in [0, 1]), keyed like :func:`torch_defense_outputs`.

    ``directory`` runs on the runtime's own backend (:func:`ism_edge.backends.select_backend`,
    ONNX Runtime on the CPU by default) in batches of its maximum, and the outputs are decided by
    :func:`ism_edge.decision.decide`: the code that ships, not a copy of it.
    """
    from ism_edge.backends import ChainOutput, select_backend
    from ism_edge.decision import decide

    cls = select_backend(backend, manifest, directory)
    with cls(directory, manifest, device=device) as runner:
        out = ChainOutput.concatenate(
            [runner.infer(np.ascontiguousarray(x[s])) for s in _batches(len(x), runner.max_batch)]
        )
    decided = decide(out, manifest)
    flags = {f"flag_{s}": f for s, f in decided.detector_flags.items()}
    return {"label": decided.labels, "flagged": decided.flags, **decided.scores, **flags}


def defense_outputs(
    files: Mapping[str, Path], root: Path, bundle: DefenseBundle, x: np.ndarray, *, batch: int = 64
) -> dict[str, np.ndarray]:
    """The deployed defense on ``x`` with the graph ``files`` under ``root``, as the runtime computes it.

    :func:`runtime_defense_outputs` with :func:`gate_manifest`: first-pass recon error, feedback
    reformation, JSD between C(x) and C(x̂) at the detector temperature, P on (x, x̂), flags and
    label — the same chain as :class:`ism_edge_training.defense.Defense`.
    """
    return runtime_defense_outputs(root, gate_manifest(files, root, bundle, batch=batch), x)


def torch_defense_outputs(bundle: DefenseBundle, x: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    """:class:`ism_edge_training.defense.Defense` on ``x``, as numpy arrays keyed like :func:`defense_outputs`."""
    import torch

    from ism_edge_training.defense import Defense

    defense = Defense(bundle).eval()
    parts: list[dict[str, np.ndarray]] = []
    for s in _batches(len(x), batch):
        with torch.no_grad():
            out = defense(torch.from_numpy(np.ascontiguousarray(x[s])))
        part = {"label": out.label.numpy(), "flagged": out.flagged.numpy()}
        for name, score in out.scores().items():
            part[name] = score.numpy()
            thr = defense.thresholds.get(name)
            part[f"flag_{name}"] = (score > thr).numpy() if thr is not None else np.zeros(len(score), dtype=bool)
        parts.append(part)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def compare_defense(
    ours: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], tol: Tolerance, thresholds: Mapping[str, float]
) -> dict[str, Any]:
    """Label and flag agreement of the pipeline on graph outputs against PyTorch's ``Defense``."""
    n = len(ref["label"])
    report: dict[str, Any] = {
        "label_agreement": float(np.mean(ours["label"] == ref["label"])),
        "flag_agreement": float(np.mean(ours["flagged"] == ref["flagged"])),
        "flag_rate": float(np.mean(ref["flagged"])),
        "n": n,
    }
    per_score: dict[str, Any] = {}
    for s in SCORES:
        agree = ours[f"flag_{s}"] == ref[f"flag_{s}"]
        diff = np.abs(np.asarray(ours[s], np.float64) - np.asarray(ref[s], np.float64))
        entry: dict[str, Any] = {
            "agreement": float(agree.mean()), "max_abs": float(diff.max()), "flips": int(np.sum(~agree))
        }
        if s in thresholds:
            band = tol.max_abs * (1.0 + abs(thresholds[s]))
            entry["borderline"] = int(np.sum(~agree & (np.abs(np.asarray(ref[s], np.float64) - thresholds[s]) <= band)))
        per_score[s] = entry
    report["scores"] = per_score
    report["min_agreement"] = tol.agreement
    report["ok"] = report["label_agreement"] >= tol.agreement and report["flag_agreement"] >= tol.agreement
    return report


def graph_report(
    role: str, file: str, sha256: str, ours: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], tol: Tolerance
) -> dict[str, Any]:
    """Parity entry of one graph file (outputs, plus label agreement for the classifier)."""
    outputs = compare_outputs(ours, ref, tol)
    entry: dict[str, Any] = {"file": file, "sha256": sha256, "outputs": outputs}
    ok = all(o["ok"] for o in outputs.values())
    if role == "classifier":
        agree = float(np.mean(np.argmax(ours["logits"], 1) == np.argmax(ref["logits"], 1)))
        entry["label_agreement"] = agree
        ok = ok and agree >= tol.agreement
    entry["ok"] = ok
    return entry


def tolerances_dict() -> dict[str, dict[str, float]]:
    return {k: asdict(v) for k, v in TOLERANCES.items()}


def raise_on_failure(report: Mapping[str, Any], what: str, samples: str) -> None:
    """Raise :class:`ParityError` naming the first graph (or the defense) outside tolerance."""
    if report.get("ok", True):
        return
    for role, entry in report.get("graphs", {}).items():
        if entry.get("ok", True):
            continue
        for out, o in entry["outputs"].items():
            if not o["ok"]:
                detail = o.get("error") or (
                    f"max |Δ| {o['max_abs']:.3g} (limit {o['limit_max_abs']:.3g}, exceeded on "
                    f"{o.get('samples_over_max', '?')} samples), "
                    f"mean |Δ| {o['mean_abs']:.3g} (limit {o['limit_mean_abs']:.3g})"
                )
                raise ParityError(
                    f"parity check failed: the {what} {role} graph {entry['file']} differs from PyTorch on "
                    f"'{out}': {detail} over {samples}; the graph is not fit to deploy at this precision "
                    "(build with --precision fp32, or check the bundle for overflowing weights)"
                )
        raise ParityError(
            f"parity check failed: the {what} {role} graph {entry['file']} agrees with PyTorch on "
            f"{entry.get('label_agreement', 0):.1%} of labels over {samples}: build with --precision fp32"
        )
    d = report.get("defense", {})
    raise ParityError(
        f"parity check failed: the {what} defense agrees with PyTorch on {d.get('label_agreement', 0):.1%} "
        f"of labels and {d.get('flag_agreement', 0):.1%} of flags over {samples} (needs "
        f"{d.get('min_agreement', 0):.1%}): build with --precision fp32"
    )
