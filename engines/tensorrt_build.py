"""ONNX → TensorRT engine (plan), for TensorRT 10 (JetPack 6 Orin) and 11 alike (docs/engines.md).

The network is created **strongly typed** from the mixed-precision FP16 ONNX graph
(:mod:`ism_edge_engines.fp16`): every tensor's type comes from the graph, so no precision builder flag is
set (TensorRT 11 removed ``BuilderFlag.FP16``; strongly typed networks reject it on 10 too), and
TF32 — on by default, and allowed for FP32 tensors of a strongly typed network — is cleared, so
an FP32 tensor in the graph (every tensor of an ``fp32`` build) is computed in FP32, not with
TF32's 10-bit mantissas on Ampere and newer (Orin included).
One optimization profile covers the batch range (min/opt/max), the workspace memory pool is
limited, and a timing cache is loaded before and saved after the build so later builds skip
tactic timing; an unreadable or corrupt cache is replaced by an empty one with a warning.
Written against the TensorRT 10 Python API and type-checked with mypy against
``tensorrt-stubs``; whether a real TensorRT (not only the stubs) of version 10 or newer is
installed is decided by :mod:`ism_edge.backends.tensorrt.loader`.

:func:`build` is the TensorRT step of :func:`ism_edge_engines.build.build_engines` (one plan per role from
the exported graphs of the build's precision); :func:`plans_from_onnx` is shared with the rebuild.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ism_edge._io import atomic_write_bytes
from ism_edge.backends.tensorrt import loader
from ism_edge.errors import EngineError
from ism_edge_engines.artifacts import Built, engine_file_name
from ism_edge_engines.progress import Steps

if TYPE_CHECKING:
    import tensorrt as trt


def tensorrt_available() -> bool:
    """True when a real TensorRT of a supported version (10 or newer) can be imported."""
    return loader.tensorrt_usable()


def _require_tensorrt() -> None:
    loader.tensorrt_module("building TensorRT engines")


def gpu_for_build() -> dict[str, str]:
    """The GPU a TensorRT build is for; TensorRT must be importable and a GPU visible before a
    build starts (a one-line error saying what to install or check otherwise)."""
    from ism_edge.compat import current_gpu

    _require_tensorrt()
    gpu = current_gpu()
    if gpu is None:
        raise EngineError("TensorRT is installed but no CUDA GPU is visible (cuda-python reports none): "
                          "check the driver, or build with --backend onnxruntime")
    return gpu


def default_timing_cache() -> Path:
    """Where ``ism-edge build`` keeps the TensorRT timing cache between builds.

    One file per TensorRT version and GPU (a timing cache is only valid for both), under
    ``$XDG_CACHE_HOME/ism-edge`` (default ``~/.cache/ism-edge``).
    """
    from ism_edge.compat import current_gpu

    gpu = current_gpu() or {"name": "nogpu"}
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", f"trt{tensorrt_version()}-{gpu['name']}").strip("-")
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ism-edge"
    return root / f"{tag}.timing-cache"


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes of the one optimization profile: ``min <= opt <= max``."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile must satisfy 1 <= min <= opt <= max, got {self.min},{self.opt},{self.max}")


@dataclass(frozen=True)
class BuiltPlan:
    """What one build produced: the plan file and its I/O tensors as TensorRT sees them."""

    path: Path
    inputs: dict[str, tuple[int, ...]]
    outputs: dict[str, tuple[int, ...]]
    timing_cache_saved: bool


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


def _parser_errors(parser: trt.OnnxParser) -> str:
    lines: list[str] = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = err.node_name() or f"#{err.node()}"
        lines.append(f"node {node} ({err.node_operator()}): {err.desc()}")
    return "; ".join(lines) or "no error reported by the parser"


def engine_from_onnx(
    onnx_path: str | os.PathLike[str],
    plan_path: str | os.PathLike[str],
    *,
    batch: BatchProfile,
    workspace_mb: int = 1024,
    timing_cache: str | os.PathLike[str] | None = None,
    verbose: bool = False,
) -> BuiltPlan:
    """Parse ``onnx_path`` into a strongly typed network and write the serialized engine to ``plan_path``.

    Every network input gets the profile ``(min|opt|max, *rest)`` on its batch axis. The
    workspace pool is limited to ``workspace_mb`` MiB. ``timing_cache`` is read when it exists
    and written back (atomically) after a successful build.
    """
    _require_tensorrt()
    import tensorrt as trt

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if workspace_mb < 1:
        raise ValueError(f"workspace_mb must be >= 1, got {workspace_mb}")
    logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {_parser_errors(parser)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    profile = builder.create_optimization_profile()
    inputs: dict[str, tuple[int, ...]] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = _dims(tensor.shape)
        if len(shape) < 1 or shape[0] != -1 or any(d < 0 for d in shape[1:]):
            raise EngineError(
                f"{onnx_path}: input {tensor.name!r} has shape {shape}; only the batch axis may be dynamic"
            )
        rest = list(shape[1:])
        profile.set_shape(
            tensor.name,
            trt.Dims([batch.min, *rest]),
            trt.Dims([batch.opt, *rest]),
            trt.Dims([batch.max, *rest]),
        )
        inputs[tensor.name] = shape
    config.add_optimization_profile(profile)
    outputs = {network.get_output(i).name: _dims(network.get_output(i).shape) for i in range(network.num_outputs)}

    config.clear_flag(trt.BuilderFlag.TF32)

    cache_path = Path(timing_cache) if timing_cache is not None else None
    if not config.set_timing_cache(_timing_cache(config, cache_path), ignore_mismatch=False):
        _warn(f"timing cache {cache_path} was written by another TensorRT version or for another GPU")
        config.set_timing_cache(_empty_timing_cache(config), ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None or serialized.nbytes == 0:
        raise EngineError(
            f"TensorRT could not build an engine from {onnx_path} (see the TensorRT log above): "
            "raise --workspace or lower the max batch of --batch"
        )
    atomic_write_bytes(plan_path, bytes(memoryview(serialized)))
    saved = False
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
        saved = True
    return BuiltPlan(path=plan_path, inputs=inputs, outputs=outputs, timing_cache_saved=saved)


def _timing_cache(config: trt.IBuilderConfig, path: Path | None) -> trt.ITimingCache:
    """The timing cache stored at ``path``, or an empty one (with a warning when ``path`` exists).

    A cache written by another TensorRT version or GPU, a truncated file or one that is not a
    cache at all must not stop the build: it only costs the tactic timing again (Polygraphy wraps
    its timing-cache load the same way).
    """
    blob = b""
    if path is not None and path.is_file():
        try:
            blob = path.read_bytes()
        except OSError as e:
            _warn(f"timing cache {path} cannot be read ({e.strerror})")
    if blob:
        loaded: trt.ITimingCache | None
        try:
            loaded = config.create_timing_cache(blob)
            reason = "TensorRT rejected it"
        except Exception as e:  # TensorRT's bindings raise a plain RuntimeError for a corrupt cache
            loaded, reason = None, _first_line(e)
        if loaded is not None:
            return loaded
        _warn(f"timing cache {path} is corrupt or not a TensorRT timing cache ({reason})")
    return _empty_timing_cache(config)


def _empty_timing_cache(config: trt.IBuilderConfig) -> trt.ITimingCache:
    cache: trt.ITimingCache | None = config.create_timing_cache(b"")
    if cache is None:
        raise EngineError("TensorRT could not create an empty timing cache (see the TensorRT log above)")
    return cache


def _warn(problem: str) -> None:
    warnings.warn(f"{problem}: building with an empty timing cache, saved over it after the build", stacklevel=2)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def tensorrt_version() -> str:
    """Version of the importable TensorRT (raises when TensorRT is missing or older than 10)."""
    return str(loader.tensorrt_module("building TensorRT engines").__version__)


def plans_from_onnx(
    sources: Mapping[str, Path],
    root: Path,
    precision: str,
    steps: Steps,
    *,
    batch: BatchProfile,
    workspace_mb: int,
    timing_cache: str | os.PathLike[str] | None,
) -> dict[str, Path]:
    """Each role's TensorRT engine, built from its source graph and saved in ``root``; ``{role: path}``."""
    out: dict[str, Path] = {}
    for role, src in sources.items():
        with steps(f"build TensorRT engine {role}"):
            dst = root / engine_file_name("tensorrt", precision, role)
            out[role] = engine_from_onnx(
                src, dst, batch=batch, workspace_mb=workspace_mb, timing_cache=timing_cache
            ).path
    return out


def build(
    graphs: Mapping[str, Path],
    root: Path,
    precision: str,
    steps: Steps,
    *,
    batch: BatchProfile,
    workspace_mb: int,
    timing_cache: str | os.PathLike[str] | None,
) -> Built:
    """TensorRT engines of the exported ``graphs`` of the build's precision (``{role: path}``).

    The engines are not run at build time (the build machine need not be the target); the graphs
    they are built from passed the export's parity gate.
    """
    sources = dict(graphs)
    engines = plans_from_onnx(sources, root, precision, steps, batch=batch, workspace_mb=workspace_mb,
                              timing_cache=timing_cache)
    engine = {"measured": False, "ok": True,
              "reason": "TensorRT engines are not run at build time; the graph they were built from is gated"}
    return Built(engines=engines, sources=sources, report={"engine": engine}, measured=False)
