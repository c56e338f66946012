"""Bundle → engine directory: export, FP16 graphs, parity gate, backend build, manifest (SPEC §4).

An engine directory (written atomically: a temporary sibling renamed into place, so an
interrupted build leaves nothing behind)::

    DIR/
      manifest.json                 ism_edge.manifest.EngineManifest (parity report included)
      onnx/{role}.onnx              FP32 source graph (dynamic batch axis N, opset 18)
      onnx/{role}.fp16.onnx         mixed-precision FP16 graph, FP32 I/O (engines.fp16)
      onnx/{role}.int8.onnx         QDQ INT8 graph (ONNX Runtime INT8 builds only)
      onnx/{role}[.fp16].subpixel.onnx  ONNX Runtime FP32/FP16 source: transposed convolutions as
                                    sub-pixel convolutions (engines.subpixel; mapper only)
      {role}.onnx | {role}.fp16.onnx | {role}.int8.onnx   ONNX Runtime optimized model
      {role}.plan                   TensorRT engine (TensorRT builds)

:func:`build_engines` needs torch (it exports and checks parity against PyTorch).
:func:`rebuild_from_onnx` recompiles an existing directory's hash-verified ONNX sources for this
machine and imports neither torch nor onnx, so the runtime can call it on a deployment target.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ism_edge._io import atomic_directory, sha256_file
from ism_edge.errors import BundleError, EngineError, missing_dependency
from ism_edge.manifest import (
    BACKENDS,
    DEFAULT_DETECTOR_TEMPERATURE,
    MANIFEST_NAME,
    ROLES,
    EngineFile,
    EngineManifest,
    load_manifest,
)

if TYPE_CHECKING:
    from training.bundle import DefenseBundle

BACKEND_CHOICES = ("auto", *BACKENDS)
PRECISION_CHOICES = ("fp32", "fp16", "int8")
DEFAULT_BATCH = (1, 8, 64)
DEFAULT_WORKSPACE_MB = 1024
PARITY_SAMPLES = 256
CALIBRATION_SAMPLES = 256
ONNX_DIR = "onnx"
StepCallback = Callable[[str, "float | None"], None]


# -- progress ---------------------------------------------------------------------------------


@dataclass
class Steps:
    """Names and wall-clock durations of build steps; ``callback(name, None)`` at the start of a
    step and ``callback(name, seconds)`` at its end (the CLI prints both)."""

    callback: StepCallback | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.callback is not None:
            self.callback(name, None)
        t = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - t
        if self.callback is not None:
            self.callback(name, self.timings[name])


# -- helpers ----------------------------------------------------------------------------------


def resolve_backend(backend: str) -> str:
    """``auto`` → ``tensorrt`` when a real TensorRT is importable, else ``onnxruntime``."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
    if backend != "auto":
        return backend
    from engines.tensorrt_build import tensorrt_available

    return "tensorrt" if tensorrt_available() else "onnxruntime"


def default_precision(backend: str) -> str:
    """FP16 for TensorRT; FP32 for ONNX Runtime on CPU, where FP16 is slower (SPEC §4)."""
    return "fp16" if resolve_backend(backend) == "tensorrt" else "fp32"


def _validate(backend: str, precision: str, batch: tuple[int, int, int], workspace_mb: int) -> None:
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    if backend == "tensorrt" and precision == "int8":
        raise EngineError("INT8 TensorRT engines are not supported: build with --precision fp16 (TensorRT) or --backend onnxruntime --precision int8")
    if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
        raise ValueError(f"batch must be MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got {batch}")
    if workspace_mb < 1:
        raise ValueError(f"workspace must be >= 1 MB, got {workspace_mb}")


def _check_out_dir(out_dir: Path, *sources: Path, marker: str = MANIFEST_NAME) -> None:
    """Refuse to replace anything but an earlier output (atomic_directory swaps the whole folder)."""
    kind = "an engine" if marker == MANIFEST_NAME else "an ONNX export"
    for src in sources:
        if out_dir.resolve() == src.resolve():
            raise EngineError(f"--out {out_dir} is the source directory itself: choose another output directory")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / marker).is_file())):
        raise EngineError(f"{out_dir} exists and is not {kind} directory: choose another --out or remove it")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _versions(backend: str, *, with_torch: bool) -> dict[str, str]:
    import numpy
    import onnxruntime

    import ism_edge

    v = {"ism_edge": ism_edge.__version__, "onnxruntime": onnxruntime.__version__,
         "numpy": numpy.__version__, "python": platform.python_version()}
    if with_torch:
        import onnx
        import torch

        from engines.export import OPSET

        v.update({"torch": torch.__version__, "onnx": onnx.__version__, "opset": str(OPSET)})
    if backend == "tensorrt":
        from engines.tensorrt_build import tensorrt_version

        v["tensorrt"] = tensorrt_version()
    return v


def engine_file_name(backend: str, precision: str, role: str) -> str:
    """File name of a role's engine in the directory (see the module docstring)."""
    if backend == "tensorrt":
        return f"{role}.plan"
    return f"{role}.onnx" if precision == "fp32" else f"{role}.{precision}.onnx"


def source_name(precision: str, role: str) -> str:
    """Path (relative to the engine directory) of the ONNX graph a role's engine is compiled from."""
    return f"{ONNX_DIR}/{role}.onnx" if precision == "fp32" else f"{ONNX_DIR}/{role}.{precision}.onnx"


def _gpu_for_tensorrt() -> dict[str, str]:
    """TensorRT must be importable and a GPU visible before a TensorRT build starts."""
    from engines.tensorrt_build import tensorrt_available
    from ism_edge.compat import current_gpu

    if not tensorrt_available():
        raise missing_dependency("tensorrt", "tensorrt", "building TensorRT engines")
    gpu = current_gpu()
    if gpu is None:
        raise EngineError("TensorRT is installed but no CUDA GPU is visible (cuda-python reports none): "
                          "check the driver, or build with --backend onnxruntime")
    return gpu


# -- graphs -----------------------------------------------------------------------------------


def load_deployable(bundle_dir: Path) -> DefenseBundle:
    """Load a bundle of the full defense; evaluation baselines (``--baseline``) are refused.

    The engines and the runtime implement the full chain (M, C, P, three detectors); a baseline
    bundle lacks networks or deploys fewer detectors, so compiling it would change what it means.
    """
    from training.bundle import DefenseBundle, DefenseSpec

    bundle = DefenseBundle.load(bundle_dir)
    if bundle.defense != DefenseSpec():
        raise BundleError(f"{bundle_dir} is the evaluation baseline {bundle.defense.baseline!r}, not the full "
                          "defense: only full-defense bundles (ism-edge train without --baseline) can be compiled")
    return bundle


def export_graphs(bundle: DefenseBundle, onnx_dir: Path, steps: Steps, *, metadata: dict[str, str]) -> dict[str, dict[str, Path]]:
    """Export the FP32 graphs to ``onnx_dir`` and convert each to FP16; ``{precision: {role: path}}``."""
    from engines.export import graph_modules, onnx_from_module
    from engines.fp16 import fp16_from_onnx

    cfg = bundle.config
    input_shape = (cfg.channels, cfg.image_size, cfg.image_size)
    modules = graph_modules(bundle)
    paths: dict[str, dict[str, Path]] = {"fp32": {}, "fp16": {}}
    for role in ROLES:
        with steps(f"export {role} to ONNX"):
            paths["fp32"][role] = onnx_from_module(modules[role], role, onnx_dir / f"{role}.onnx", input_shape, metadata=metadata)
    for role in ROLES:
        with steps(f"convert {role} to FP16"):
            paths["fp16"][role] = fp16_from_onnx(paths["fp32"][role], onnx_dir / f"{role}.fp16.onnx")
    return paths


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
    defense run by the runtime's backend and decision code, :func:`engines.parity.defense_outputs`)."""
    from engines import ort_build, parity

    tol = parity.TOLERANCES[precision]
    runners = {role: ort_build.runner(ort_build.session(path)) for role, path in files.items()}
    graphs: dict[str, Any] = {}
    for role, path in files.items():
        feed = parity.graph_inputs(role, x, reference)
        ours = parity.run_batched(runners[role], feed, batch)
        graphs[role] = parity.graph_report(role, path.relative_to(root).as_posix(), sha256_file(path), ours, reference[role], tol)
    ours_defense = parity.defense_outputs(files, root, bundle, x, batch=batch)
    defense = parity.compare_defense(ours_defense, torch_defense, tol, bundle.thresholds)
    ok = all(g["ok"] for g in graphs.values()) and defense["ok"]
    return {"precision": precision, "graphs": graphs, "defense": defense, "ok": ok}


EXPORT_REPORT = "export.json"


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
    from engines import parity
    from engines.samples import real_samples
    from ism_edge._io import atomic_write_json
    from ism_edge.compat import bundle_sha256

    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    _check_out_dir(out_dir, bundle_dir, marker=EXPORT_REPORT)
    steps = Steps(on_step)
    started = time.perf_counter()
    with steps("load bundle"):
        bundle = load_deployable(bundle_dir)
        digest = bundle_sha256(bundle_dir)
    cfg = bundle.config
    input_shape = (cfg.channels, cfg.image_size, cfg.image_size)
    with steps("read parity samples"):
        x, sample_source = real_samples(input_shape, parity_samples, split="test")
    with atomic_directory(out_dir) as tmp:
        graphs = export_graphs(bundle, tmp, steps, metadata={"ism_edge.bundle_sha256": digest})
        with steps("PyTorch reference outputs"):
            reference = parity.reference_outputs(bundle, x)
            torch_defense = parity.torch_defense_outputs(bundle, x)
        report: dict[str, Any] = {
            "bundle_sha256": digest,
            "bundle_name": bundle_dir.resolve().name,
            "input_shape": list(input_shape),
            "samples": {"n": int(len(x)), "source": sample_source},
            "tolerances": parity.tolerances_dict(),
        }
        for prec in ("fp32", "fp16"):
            with steps(f"parity of the {prec.upper()} graphs"):
                report[prec] = parity_of_files(graphs[prec], tmp, prec, bundle, x, reference, torch_defense, 64)
        report["gated"] = ["fp32", "fp16"]
        report["ok"] = report["fp32"]["ok"] and report["fp16"]["ok"]
        report["versions"] = _versions("onnxruntime", with_torch=True)
        report["created"] = _now()
        for prec in ("fp32", "fp16"):
            parity.raise_on_failure(report[prec], prec.upper(), sample_source)
        atomic_write_json(tmp / EXPORT_REPORT, report)
    if on_step is not None:
        on_step("total", time.perf_counter() - started)
    return report


def default_timing_cache() -> Path:
    """Where ``ism-edge build`` keeps the TensorRT timing cache between builds.

    One file per TensorRT version and GPU (a timing cache is only valid for both), under
    ``$XDG_CACHE_HOME/ism-edge`` (default ``~/.cache/ism-edge``).
    """
    import re

    from engines.tensorrt_build import tensorrt_version
    from ism_edge.compat import current_gpu

    gpu = current_gpu() or {"name": "nogpu"}
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", f"trt{tensorrt_version()}-{gpu['name']}").strip("-")
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ism-edge"
    return root / f"{tag}.timing-cache"


# -- the build --------------------------------------------------------------------------------


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
    from engines import ort_build, parity
    from engines.samples import real_samples
    from ism_edge.compat import bundle_sha256

    backend = resolve_backend(backend)
    batch = (int(batch[0]), int(batch[1]), int(batch[2]))
    _validate(backend, precision, batch, workspace_mb)
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    _check_out_dir(out_dir, bundle_dir)
    steps = Steps(on_step)
    started = time.perf_counter()
    gpu = _gpu_for_tensorrt() if backend == "tensorrt" else None

    with steps("load bundle"):
        bundle = load_deployable(bundle_dir)
        missing = [s for s in parity.SCORES if s not in bundle.thresholds]
        if missing:
            raise BundleError(
                f"bundle {bundle_dir} has no calibrated threshold for {', '.join(missing)}: run the "
                "'calibrate' stage of 'ism-edge train' on it before building engines"
            )
        digest = bundle_sha256(bundle_dir)
    cfg = bundle.config
    input_shape = (cfg.channels, cfg.image_size, cfg.image_size)

    with steps("read parity samples"):
        x, sample_source = real_samples(input_shape, parity_samples, split="test")
    pbatch = 64

    with atomic_directory(out_dir) as tmp:
        onnx_dir = tmp / ONNX_DIR
        graphs = export_graphs(bundle, onnx_dir, steps, metadata={"ism_edge.bundle_sha256": digest})
        with steps("PyTorch reference outputs"):
            reference = parity.reference_outputs(bundle, x, pbatch)
            torch_defense = parity.torch_defense_outputs(bundle, x, pbatch)
        report: dict[str, Any] = {
            "samples": {"n": int(len(x)), "source": sample_source},
            "tolerances": parity.tolerances_dict(),
        }
        for prec in ("fp32", "fp16"):
            with steps(f"parity of the {prec.upper()} graphs"):
                report[prec] = parity_of_files(graphs[prec], tmp, prec, bundle, x, reference, torch_defense, pbatch)
        gated = ["fp16" if precision == "fp16" else "fp32"]
        parity.raise_on_failure(report[gated[0]], gated[0].upper(), sample_source)

        engines: dict[str, Path] = {}
        sources: dict[str, Path] = {}
        if backend == "onnxruntime":
            if precision == "int8":
                sources = _quantize(bundle, tmp, graphs["fp32"], input_shape, calibration_samples, steps, report)
            else:
                with steps("rewrite transposed convolutions as sub-pixel convolutions"):
                    sources = _subpixel_sources(graphs[precision])
            for role in ROLES:
                with steps(f"optimize {role} for ONNX Runtime"):
                    engines[role] = ort_build.optimized_model_from_onnx(sources[role], tmp / engine_file_name(backend, precision, role))
            with steps(f"parity of the built {precision.upper()} engines"):
                report["engine"] = parity_of_files(engines, tmp, precision, bundle, x, reference, torch_defense, pbatch)
            gated.append("engine")
            if precision == "int8":
                with steps("INT8 vs FP32 latency"):
                    report["int8_latency_ms"] = _int8_latency(graphs["fp32"], engines, tmp, x, reference, batch[1])
        else:
            from engines.tensorrt_build import BatchProfile, engine_from_onnx

            sources = dict(graphs[precision])
            profile = BatchProfile(*batch)
            for role in ROLES:
                with steps(f"build TensorRT engine {role}"):
                    built = engine_from_onnx(sources[role], tmp / engine_file_name(backend, precision, role), batch=profile,
                                             workspace_mb=workspace_mb, timing_cache=timing_cache)
                    engines[role] = built.path
            report["engine"] = {"measured": False, "ok": True,
                                "reason": "TensorRT engines are not run at build time; the graph they were built from is gated"}
        report["gated"] = gated
        report["ok"] = all(report[g]["ok"] for g in gated)
        report["sources"] = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(onnx_dir.glob("*.onnx"))}
        if "engine" in gated:
            parity.raise_on_failure(report["engine"], f"built {precision.upper()}", sample_source)

        with steps("write manifest"):
            manifest = EngineManifest(
                backend=backend,
                precision=precision,
                input_shape=input_shape,
                class_names=tuple(bundle.class_names),
                thresholds={s: float(bundle.thresholds[s]) for s in parity.SCORES},
                temperatures={"deploy": float(bundle.temperatures.get("deploy", 1.0)),
                              "detector": float(bundle.temperatures.get("detector", DEFAULT_DETECTOR_TEMPERATURE))},
                target_fpr=float(bundle.target_fpr),
                batch={"min": batch[0], "opt": batch[1], "max": batch[2]},
                engines={role: _engine_file(role, engines[role], sources[role], tmp, input_shape, cfg.num_classes) for role in ROLES},
                bundle_sha256=digest,
                bundle_name=bundle_dir.resolve().name,
                color_order="RGB",
                label_source=bundle.label_source,
        feedback_rounds=int(bundle.feedback_rounds),
                versions=_versions(backend, with_torch=True),
                gpu=gpu,
                parity=report,
                created=_now(),
            )
            manifest.save(tmp)
    if on_step is not None:
        on_step("total", time.perf_counter() - started)
    return out_dir


def _engine_file(role: str, engine: Path, source: Path, root: Path, input_shape: tuple[int, int, int], num_classes: int) -> EngineFile:
    from engines.export import tensor_specs

    ins, outs = tensor_specs(role, input_shape, num_classes)
    return EngineFile(role=role, file=engine.relative_to(root).as_posix(), onnx=source.relative_to(root).as_posix(),
                      sha256=sha256_file(engine), inputs=ins, outputs=outs)


def _subpixel_sources(graphs: Mapping[str, Path]) -> dict[str, Path]:
    """ONNX Runtime sources: each graph with its strided transposed convolutions rewritten
    (``onnx/{role}[.fp16].subpixel.onnx``, :mod:`engines.subpixel`), or the graph itself when it has none."""
    from engines.subpixel import subpixel_from_onnx

    return {role: subpixel_from_onnx(path, path.with_name(f"{path.name.removesuffix('.onnx')}.subpixel.onnx")) or path
            for role, path in graphs.items()}


def _quantize(
    bundle: DefenseBundle,
    root: Path,
    fp32: Mapping[str, Path],
    input_shape: tuple[int, int, int],
    calibration: np.ndarray | None,
    steps: Steps,
    report: dict[str, Any],
) -> dict[str, Path]:
    """INT8 QDQ graphs calibrated on clean images x and their reconstructions M(x).

    The classifier runs on both x and x̂ in deployment, so it is calibrated on both; the
    perturbation graph on the pairs (x, M(x)).
    """
    from engines import ort_build
    from engines.samples import real_samples

    with steps("read calibration samples"):
        if calibration is None:
            cal, source = real_samples(input_shape, CALIBRATION_SAMPLES, split="train")
        else:
            cal = np.ascontiguousarray(calibration, dtype=np.float32)
            if cal.ndim != 4 or cal.shape[1:] != input_shape:
                raise ValueError(f"calibration_samples must be float32 N×{'×'.join(map(str, input_shape))} pixels in [0, 1], got {cal.shape}")
            source = f"{len(cal)} user-supplied clean images"
        x_hat = ort_build.runner(ort_build.session(fp32["mapper"]))({"x": cal})["x_hat"]
    report["calibration"] = {"n": int(len(cal)), "source": source, "method": "minmax, static QDQ, per-channel S8 weights, U8 activations"}
    feeds = {"mapper": {"x": cal}, "classifier": {"x": np.concatenate([cal, x_hat])},
             "perturbation": {"x": cal, "x_hat": x_hat}}
    out: dict[str, Path] = {}
    for role in ROLES:
        with steps(f"quantize {role} to INT8"):
            out[role] = ort_build.int8_from_onnx(fp32[role], root / source_name("int8", role), feeds[role])
    return out


def _int8_latency(fp32: Mapping[str, Path], engines: Mapping[str, Path], root: Path, x: np.ndarray,
                  reference: Mapping[str, Mapping[str, np.ndarray]], opt_batch: int) -> dict[str, Any]:
    """Median CPU latency of each FP32 graph and its INT8 engine at the opt batch size (ms)."""
    from engines import ort_build, parity

    n = min(opt_batch, len(x))
    out: dict[str, Any] = {"batch": n}
    for role in ROLES:
        feed = {k: v[:n] for k, v in parity.graph_inputs(role, x, reference).items()}
        out[role] = {"fp32": ort_build.latency_ms(fp32[role], feed), "int8": ort_build.latency_ms(engines[role], feed)}
    return out


# -- rebuild on another machine ---------------------------------------------------------------


def rebuild_from_onnx(
    engine_dir: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    backend: str | None = None,
    batch: tuple[int, int, int] | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | os.PathLike[str] | None = None,
    on_step: StepCallback | None = None,
    precision: str | None = None,
) -> EngineManifest:
    """Recompile the stored ONNX sources of ``engine_dir`` for this machine (no torch, no onnx).

    The sources are verified against the SHA-256 recorded at build time (a corrupted or edited
    graph is refused). The engines are rebuilt for ``backend`` (default: the manifest's; an
    INT8 directory can only be rebuilt for ONNX Runtime; ``precision``, when given, must be the
    directory's) into ``out_dir`` (default: in place,
    atomically) and a new manifest is written; thresholds, class names and the graph parity
    report of the original build are kept (the graphs are byte-identical).
    """
    engine_dir = Path(engine_dir)
    target = Path(out_dir) if out_dir is not None else engine_dir
    old = load_manifest(engine_dir, verify_files=False)
    new_backend = resolve_backend(backend or old.backend)
    if precision is not None and precision != old.precision:
        raise EngineError(
            f"{engine_dir} holds {old.precision} graphs and is rebuilt at that precision: to build "
            f"{precision} engines, run 'ism-edge build BUNDLE --out {target} --precision {precision}'"
        )
    precision = old.precision
    prof = batch or (old.batch["min"], old.batch["opt"], old.batch["max"])
    _validate(new_backend, precision, prof, workspace_mb)
    if target != engine_dir:
        _check_out_dir(target, engine_dir)
    recorded = old.parity.get("sources", {}) if isinstance(old.parity, dict) else {}
    steps = Steps(on_step)
    started = time.perf_counter()
    gpu = _gpu_for_tensorrt() if new_backend == "tensorrt" else None

    with steps("verify ONNX sources"):
        # every recorded graph is copied (the FP32 export also gives the bench its FLOP counts), so all are checked
        sources = {ef.onnx: f"{role} source" for role, ef in old.engines.items()}
        for name in recorded:
            sources.setdefault(name, f"{Path(name).name.split('.')[0]} graph")
        for name, what in sources.items():
            path = engine_dir / name
            want = recorded.get(name)
            if not path.is_file():
                raise EngineError(f"{path} ({what}) is missing: rebuild from the bundle with 'ism-edge build BUNDLE --out {target}'")
            if want is None or sha256_file(path) != want:
                raise EngineError(
                    f"{path} ({what}) does not match the hash recorded in {engine_dir / MANIFEST_NAME} "
                    f"(corrupted or modified): rebuild from the bundle with 'ism-edge build BUNDLE --out {target}'"
                )

    with atomic_directory(target) as tmp:
        with steps("copy ONNX sources"):  # the verified files only: never what a symlink in onnx/ leads to
            for name in sources:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(engine_dir / name, tmp / name)
        engines: dict[str, EngineFile] = {}
        for role, ef in old.engines.items():
            src = tmp / ef.onnx
            dst = tmp / engine_file_name(new_backend, precision, role)
            if new_backend == "onnxruntime":
                from engines import ort_build

                with steps(f"optimize {role} for ONNX Runtime"):
                    ort_build.optimized_model_from_onnx(src, dst)
            else:
                from engines.tensorrt_build import BatchProfile, engine_from_onnx

                with steps(f"build TensorRT engine {role}"):
                    engine_from_onnx(src, dst, batch=BatchProfile(*prof), workspace_mb=workspace_mb, timing_cache=timing_cache)
            engines[role] = replace(ef, file=dst.relative_to(tmp).as_posix(), sha256=sha256_file(dst))
        versions = {k: v for k, v in old.versions.items() if k not in ("onnxruntime", "tensorrt")}
        versions.update(_versions(new_backend, with_torch=False))
        report = dict(old.parity)
        report["engine"] = {"measured": False, "ok": True, "reason": "rebuilt from the hash-verified ONNX sources; engines not re-measured"}
        report["rebuilt"] = {"from": {"backend": old.backend, "versions": dict(old.versions), "gpu": old.gpu, "created": old.created},
                             "created": _now()}
        manifest = replace(old, backend=new_backend, engines=engines, batch={"min": prof[0], "opt": prof[1], "max": prof[2]},
                           versions=versions, gpu=gpu, parity=report, created=_now())
        with steps("write manifest"):
            manifest.save(tmp)
    if on_step is not None:
        on_step("total", time.perf_counter() - started)
    return manifest
