"""Does an engine directory match this machine? (docs/engines.md: refuse, never run, a mismatched engine.)

An ONNX Runtime model optimized by one release holds fused ``com.microsoft`` ops of that
release, so the manifest's ONNX Runtime major.minor must match the running one. A TensorRT plan
runs only on the TensorRT version that built it and on the GPU it was tuned for, so the exact
TensorRT version, the GPU name and its compute capability must match. Everything is imported
lazily; this module never imports torch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ism_edge import _checks as check
from ism_edge.errors import BundleError, EngineMismatchError
from ism_edge.manifest import EngineManifest


def onnxruntime_version() -> str | None:
    """The running ONNX Runtime version, or None when it is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)


def tensorrt_version() -> str | None:
    """The running TensorRT version, or None when no real TensorRT imports (``tensorrt-stubs``
    alone is not TensorRT; see :mod:`ism_edge.backends.tensorrt.loader`)."""
    from ism_edge.backends.tensorrt.loader import tensorrt_version as installed

    return installed()


def current_gpu(device: int = 0) -> dict[str, str] | None:
    """``{"name", "compute_capability"}`` of CUDA device ``device``, or None without a GPU.

    Asks :func:`ism_edge.cuda.current_gpu` (cuda-python or pycuda, ``ISM_EDGE_CUDA`` honoured);
    a driver too old for the installed bindings raises :class:`~ism_edge.cuda.CudaError`.
    """
    from ism_edge import cuda

    info = cuda.current_gpu(device)
    return None if info is None else {"name": info.name, "compute_capability": info.compute_capability}


def bundle_sha256(directory: str | os.PathLike[str]) -> str:
    """Identity of a defense bundle without torch: SHA-256 over its manifest and weight hashes.

    The same digest as ``ism_edge_training.bundle.bundle_hash`` (recorded in every engine manifest).
    """
    directory = Path(directory)
    path = directory / "manifest.json"
    try:
        data = check.read_json_bytes(path)
        raw = check.obj(check.parse_json(data), "the manifest")
        weights = check.obj(check.require(raw, "weights", "weights"), "weights")
        digests = {name: check.sha256(check.obj(entry, f"weights.{name}").get("sha256"), f"weights.{name}.sha256")
                   for name, entry in weights.items()}
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} is not a readable defense-bundle manifest ({e}): check the bundle path") from None
    h = hashlib.sha256()
    h.update(data)
    for name in sorted(digests):
        h.update(name.encode())
        h.update(digests[name].encode())
    return h.hexdigest()


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _target(trt: str | None, gpu: dict[str, str] | None) -> str:
    where = f"{gpu['name']} ({gpu['compute_capability']})" if gpu else "no CUDA GPU"
    return f"TensorRT {trt or 'not installed'} on {where}"


def check_compatible(
    manifest: EngineManifest,
    directory: str | os.PathLike[str],
    *,
    bundle: str | os.PathLike[str] | None = None,
    gpu: int = 0,
) -> None:
    """Raise :class:`EngineMismatchError` (one line, with the rebuild command) unless the engines
    in ``directory`` were built for this machine's ONNX Runtime / TensorRT / GPU.

    ``gpu``: the CUDA device the engines will run on (TensorRT engines are tied to its model).
    With ``bundle``, also refuse engines built from another defense bundle.
    """
    directory = Path(directory)
    fix = (f"rebuild with 'ism-edge build {directory} --out {directory}' (from the stored ONNX) "
           "or pass --rebuild-on-mismatch")
    if bundle is not None:
        want = bundle_sha256(bundle)
        if want != manifest.bundle_sha256:
            raise EngineMismatchError(
                f"engine {directory} was built from another bundle ({manifest.bundle_name or 'unnamed'}, "
                f"{manifest.bundle_sha256[:12]}) than {bundle} ({want[:12]}): rebuild with "
                f"'ism-edge build {bundle} --out {directory}'"
            )
    if manifest.backend == "onnxruntime":
        built = manifest.versions.get("onnxruntime")
        running = onnxruntime_version()
        if running is None:  # the base install carries no ONNX Runtime build: the user picks one
            from ism_edge.backends.onnxruntime.runner import _onnxruntime

            _onnxruntime()
        if built is None:
            raise EngineMismatchError(f"engine {directory}: its manifest records no ONNX Runtime version: {fix}")
        if running is None or _major_minor(built) != _major_minor(running):
            raise EngineMismatchError(
                f"engine {directory} was built with ONNX Runtime {built}; this machine has "
                f"{running or 'no ONNX Runtime'}: {fix}"
            )
        return
    built_trt = manifest.versions.get("tensorrt")
    built_gpu = manifest.gpu
    running_trt = tensorrt_version()
    if running_trt is None:
        raise EngineMismatchError(
            f"engine {directory} holds TensorRT engines ({_target(built_trt, built_gpu)}) but TensorRT is not "
            f"installed here: rebuild for ONNX Runtime with 'ism-edge build {directory} --out {directory} "
            "--backend onnxruntime' or install ism-edge[tensorrt]"
        )
    running_gpu = current_gpu(gpu)
    same_gpu = (
        built_gpu is not None
        and running_gpu is not None
        and built_gpu.get("name") == running_gpu["name"]
        and built_gpu.get("compute_capability") == running_gpu["compute_capability"]
    )
    if built_trt is None or built_trt != running_trt or not same_gpu:
        raise EngineMismatchError(
            f"engine {directory} was built with {_target(built_trt, built_gpu)}; this machine has "
            f"{_target(running_trt, running_gpu)}: {fix}"
        )
