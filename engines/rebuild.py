"""Engine directory → engine directory for this machine, from its stored ONNX (docs/engines.md,
"Compatibility and rebuilds").

:func:`rebuild_from_onnx` recompiles an existing directory's hash-verified ONNX sources and
imports neither torch nor onnx, so the runtime can call it on a deployment target
(``ism-edge run --rebuild-on-mismatch``) and ``ism-edge build ENGINE_DIR`` needs only the
backend's library (a missing one is a one-line error naming the extra to install).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from ism_edge._io import atomic_directory, sha256_file
from ism_edge.errors import EngineError
from ism_edge.manifest import MANIFEST_NAME, EngineManifest, load_manifest
from ism_edge_engines import ort_build, tensorrt_build
from ism_edge_engines.artifacts import check_out_dir, library_versions, now
from ism_edge_engines.build import DEFAULT_WORKSPACE_MB, check_options, resolve_backend
from ism_edge_engines.progress import StepCallback, Steps


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
    check_options(new_backend, precision, prof, workspace_mb)
    if target != engine_dir:
        check_out_dir(target, engine_dir)
    recorded = old.parity.get("sources", {}) if isinstance(old.parity, dict) else {}
    steps = Steps(on_step)
    gpu = tensorrt_build.gpu_for_build() if new_backend == "tensorrt" else None
    new_versions = library_versions(new_backend)

    with steps("verify ONNX sources"):
        # every recorded graph is copied (the FP32 export also gives the bench its FLOP counts), so all are checked
        sources = {ef.onnx: f"{role} source" for role, ef in old.engines.items()}
        for name in recorded:
            sources.setdefault(name, f"{Path(name).name.split('.')[0]} graph")
        for name, what in sources.items():
            path = engine_dir / name
            want = recorded.get(name)
            if not path.is_file():
                raise EngineError(
                    f"{path} ({what}) is missing: rebuild from the bundle with 'ism-edge build BUNDLE --out {target}'"
                )
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
        role_sources = {role: tmp / ef.onnx for role, ef in old.engines.items()}
        if new_backend == "onnxruntime":
            built = ort_build.optimized_models(role_sources, tmp, precision, steps)
        else:
            built = tensorrt_build.plans_from_onnx(role_sources, tmp, precision, steps,
                                                   batch=tensorrt_build.BatchProfile(*prof), workspace_mb=workspace_mb,
                                                   timing_cache=timing_cache)
        engines = {role: replace(ef, file=built[role].relative_to(tmp).as_posix(), sha256=sha256_file(built[role]))
                   for role, ef in old.engines.items()}
        versions = {k: v for k, v in old.versions.items() if k not in ("onnxruntime", "tensorrt")}
        versions.update(new_versions)
        report = dict(old.parity)
        report["engine"] = {"measured": False, "ok": True,
                            "reason": "rebuilt from the hash-verified ONNX sources; engines not re-measured"}
        report["rebuilt"] = {"from": {"backend": old.backend, "versions": dict(old.versions), "gpu": old.gpu,
                                      "created": old.created},
                             "created": now()}
        manifest = replace(old, backend=new_backend, engines=engines,
                           batch={"min": prof[0], "opt": prof[1], "max": prof[2]},
                           versions=versions, gpu=gpu, parity=report, created=now())
        with steps("write manifest"):
            manifest.save(tmp)
    steps.done()
    return manifest
