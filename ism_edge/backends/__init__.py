"""Inference backends: one small interface, one folder per implementation (Polygraphy's runners).

A backend runs the whole defense chain of an engine directory on a batch of model inputs
(float32 NCHW pixels in [0, 1], the shape of ``manifest.input_shape``) and returns the raw
network outputs; the verdict logic (JSD, thresholds, labels) lives in :mod:`ism_edge.runtime` so
every backend gives the same verdicts, and the feedback rule is written once in
:mod:`ism_edge.decision` (:meth:`Backend._reform`). Chain (docs/architecture.md, "The defense
chain"; identical to ``ism_edge_training.defense``)::

    x̂, recon_error = M(x)                 first pass; recon_error is the MagNet detector score
    x̂ ← M(x̂) for the samples whose ‖x̂ − M(x̂)‖₁/(CHW) > thresholds["recon_error"], ≤ n rounds
    logits_raw = C(x), logits_reformed = C(x̂), p_score = P(x, x̂)

Like Polygraphy's ``BaseRunner`` the public methods (:meth:`Backend.activate`,
:meth:`Backend.enqueue`, :meth:`Backend.wait`, :meth:`Backend.deactivate`) check their
arguments and delegate to ``*_impl`` methods that subclasses override. ``enqueue`` may return
before the work is done (TensorRT); at most :attr:`Backend.max_in_flight` jobs may be pending.
Both backends take the same constructor arguments (:meth:`Backend.__init__`) and check each
loaded network's I/O with :meth:`Backend._check_io` against the manifest.

Selection (docs/runtime.md, "Backends"): an explicit name, else TensorRT when the engine directory holds TensorRT
engines and TensorRT + CUDA bindings are usable, else ONNX Runtime (on the directory's ONNX
Runtime models, or on the ONNX sources of a TensorRT directory).
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import numpy as np

from ism_edge import _checks as check
from ism_edge.decision import Remap, Replace, feedback_reformation
from ism_edge.errors import EngineError, EngineMismatchError, IsmEdgeError
from ism_edge.manifest import BACKENDS, GRAPH_IO, EngineManifest

BACKEND_NAMES = BACKENDS
DEVICES = ("auto", "cpu", "cuda")

#: One loaded network's tensors as a backend reports them: name -> (dtype, shape). ``dtype``
#: spelled as in :data:`ism_edge.manifest.DTYPES` (``"float32"``); ``shape`` with ``None`` for a
#: symbolic dimension, or ``None`` when the backend checks that tensor's shape itself.
TensorInfo = dict[str, tuple[str, tuple[int | None, ...] | None]]

STAGES = ("upload", "mapping", "classifier", "detectors", "download")


@dataclass
class ChainOutput:
    """Raw outputs of the defense chain for one batch of N inputs (host numpy arrays).

    ``x_hat`` is the final purified batch (float32 NCHW in [0, 1]) when it was requested, else
    ``None``. ``rounds`` counts, per sample, the feedback-reformation rounds that replaced x̂.
    ``timings_ms`` holds the backend's share of :data:`STAGES`, in milliseconds, for the batch.
    """

    recon_error: np.ndarray  # [N] float32
    logits_raw: np.ndarray  # [N, K] float32, C(x)
    logits_reformed: np.ndarray  # [N, K] float32, C(x̂)
    p_score: np.ndarray  # [N] float32 in [0, 1]
    rounds: np.ndarray  # [N] int32
    x_hat: np.ndarray | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.recon_error.shape[0])

    @staticmethod
    def concatenate(parts: list[ChainOutput]) -> ChainOutput:
        """Join batches in order; stage timings add up (the chunks ran one after the other)."""
        if len(parts) == 1:
            return parts[0]
        timings: dict[str, float] = {}
        for p in parts:
            for k, v in p.timings_ms.items():
                timings[k] = timings.get(k, 0.0) + v
        x_hats = [p.x_hat for p in parts]
        return ChainOutput(
            recon_error=np.concatenate([p.recon_error for p in parts]),
            logits_raw=np.concatenate([p.logits_raw for p in parts]),
            logits_reformed=np.concatenate([p.logits_reformed for p in parts]),
            p_score=np.concatenate([p.p_score for p in parts]),
            rounds=np.concatenate([p.rounds for p in parts]),
            x_hat=None if any(x is None for x in x_hats) else np.concatenate(x_hats),  # type: ignore[arg-type]
            timings_ms=timings,
        )


class Job:
    """Handle of one enqueued batch; :meth:`Backend.wait` turns it into a :class:`ChainOutput`."""

    __slots__ = ("batch", "serial", "payload")

    def __init__(self, batch: int, serial: int, payload: Any = None) -> None:
        self.batch = batch
        self.serial = serial
        self.payload = payload


class Backend(abc.ABC):
    """Runs the defense chain of one engine directory; use as a context manager.

    Subclasses set :attr:`name` and override :meth:`_activate_impl`, :meth:`_enqueue_impl`,
    :meth:`_wait_impl` and :meth:`_deactivate_impl`; :meth:`check_available` raises a one-line
    :class:`~ism_edge.errors.IsmEdgeError` when the backend cannot run on this machine.
    """

    name: ClassVar[str] = ""
    #: How many jobs may be enqueued and not yet waited for.
    max_in_flight: ClassVar[int] = 1

    #: The ``device`` values this backend accepts besides ``cuda:N``, and what to say when refused.
    devices: ClassVar[tuple[str, ...]] = DEVICES
    device_hint: ClassVar[str] = ""

    def __init__(
        self,
        directory: str | Path,
        manifest: EngineManifest,
        *,
        feedback_rounds: int | None = None,
        device: str = "auto",
        threads: int | None = None,
    ) -> None:
        """``device``: one of :attr:`devices` or ``"cuda:N"``; ``threads``: host threads (ONNX
        Runtime's intra-op threads; ``None``: the backend's default); ``feedback_rounds``:
        ``None`` uses the manifest's."""
        rounds = manifest.feedback_rounds if feedback_rounds is None else int(feedback_rounds)
        if rounds < 0:
            raise ValueError(f"feedback_rounds must be >= 0, got {rounds}")
        if device not in self.devices and check.cuda_index(device) is None:
            raise ValueError(f"device must be one of {', '.join(self.devices)} or cuda:N for the {self.name} "
                             f"backend{self.device_hint}, got {device!r}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.device = device
        self.threads = threads
        self.directory = Path(directory)
        self.manifest = manifest
        self.feedback_rounds = rounds
        self.input_shape: tuple[int, int, int] = tuple(manifest.input_shape)  # type: ignore[assignment]
        self.is_active = False
        self._serial = 0
        self._pending: set[int] = set()

    # -- availability -----------------------------------------------------------------------
    @classmethod
    def check_available(cls) -> None:
        """Raise a one-line error naming what to install when this backend cannot run here."""
        return None

    @classmethod
    def available(cls) -> bool:
        try:
            cls.check_available()
        except IsmEdgeError:
            return False
        return True

    # -- lifecycle ---------------------------------------------------------------------------
    def activate(self) -> Backend:
        """Load the networks and allocate every buffer (once); idempotent."""
        if not self.is_active:
            self._activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        """Release the networks and buffers; pending jobs are abandoned."""
        if self.is_active:
            self.is_active = False
            self._pending.clear()
            self._deactivate_impl()

    def __enter__(self) -> Backend:
        return self.activate()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.deactivate()

    # -- inference ---------------------------------------------------------------------------
    @property
    def max_batch(self) -> int:
        """Largest batch one job may hold (the engines' optimization-profile maximum)."""
        return int(self.manifest.batch.get("max", 64))

    def enqueue(self, x: np.ndarray, *, x_hat: bool = False) -> Job:
        """Start the chain on ``x`` (float32 [N, C, H, W] in [0, 1], 1 ≤ N ≤ max_batch).

        With ``x_hat`` the purified batch is downloaded too. Returns a job for :meth:`wait`.
        """
        if not self.is_active:
            raise RuntimeError(f"{type(self).__name__} is not active: call activate() or use it as a context manager")
        expected = self.input_shape
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4 or tuple(x.shape[1:]) != expected:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
            raise ValueError(
                f"backend input must be float32 [N, {expected[0]}, {expected[1]}, {expected[2]}], got {got}"
            )
        n = int(x.shape[0])
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"batch of {n} is outside [1, {self.max_batch}] (the engines' batch profile)")
        if len(self._pending) >= self.max_in_flight:
            raise RuntimeError(f"{self.name}: at most {self.max_in_flight} jobs may be in flight; wait() for one first")
        self._serial += 1
        job = Job(n, self._serial)
        job.payload = self._enqueue_impl(np.ascontiguousarray(x), job, want_x_hat=x_hat)
        self._pending.add(job.serial)
        return job

    def wait(self, job: Job) -> ChainOutput:
        """Block until ``job`` is done and return its outputs (host copies)."""
        if job.serial not in self._pending:
            raise RuntimeError("this job was already waited for, or belongs to another backend")
        try:
            return self._wait_impl(job)
        finally:
            self._pending.discard(job.serial)

    def done(self, job: Job) -> bool:
        """Whether ``job`` is finished, so that :meth:`wait` would not block."""
        if job.serial not in self._pending:
            raise RuntimeError("this job was already waited for, or belongs to another backend")
        return self._done_impl(job)

    def infer(self, x: np.ndarray, *, x_hat: bool = False) -> ChainOutput:
        """Run the chain on ``x`` synchronously (enqueue + wait)."""
        return self.wait(self.enqueue(x, x_hat=x_hat))

    # -- for subclasses -----------------------------------------------------------------------
    def _done_impl(self, job: Job) -> bool:
        """A backend that computes in :meth:`enqueue` (ONNX Runtime) is always done; an
        asynchronous one (TensorRT) asks its device."""
        return True

    def _reform(self, n: int, remap: Remap, replace: Replace) -> np.ndarray:
        """Feedback reformation of a batch of ``n`` (:func:`ism_edge.decision.feedback_reformation`)
        with this backend's rounds and the manifest's ``recon_error`` threshold; rounds per sample."""
        return feedback_reformation(self.feedback_rounds, self.manifest.thresholds["recon_error"], n, remap, replace)

    def _check_io(
        self, role: str, path: Path, inputs: TensorInfo, outputs: TensorInfo, *, extra_outputs: bool = False
    ) -> None:
        """Refuse a loaded network whose I/O disagrees with the manifest (a mismatched directory).

        The tensor names must be those of ``manifest.engines[role]`` (extra outputs are ignored
        when ``extra_outputs``), every one of them of its dtype there; the image inputs must be
        [N, C, H, W] of ``manifest.input_shape`` and the classifier's logits [N, num_classes]
        where the backend reports those dimensions.
        """
        spec = self.manifest.engines[role]
        want_in, want_out = tuple(t.name for t in spec.inputs), tuple(t.name for t in spec.outputs)
        fix = "the engine directory is inconsistent; rebuild it with 'ism-edge build'"
        names_ok = set(outputs) >= set(want_out) if extra_outputs else set(outputs) == set(want_out)
        if set(inputs) != set(want_in) or not names_ok:
            raise EngineMismatchError(
                f"{path} ({role}) has inputs {sorted(inputs)} and outputs {sorted(outputs)}, expected "
                f"{list(want_in)} -> {list(want_out)}: {fix}"
            )
        for kind, tensors, specs in (("input", inputs, spec.inputs), ("output", outputs, spec.outputs)):
            for t in specs:
                dtype = tensors[t.name][0]
                if dtype != t.dtype:
                    raise EngineMismatchError(
                        f"{path} ({role}) {kind} {t.name!r} is {dtype}, expected {t.dtype}: {fix}"
                    )
        c, h, w = self.manifest.input_shape
        for name, (_, shape) in inputs.items():
            if shape is not None and (
                len(shape) != 4 or any(d is not None and d != e for d, e in zip(shape[1:], (c, h, w), strict=True))
            ):
                raise EngineMismatchError(
                    f"{path} ({role}) input {name!r} has shape {list(shape)}, "
                    f"but the manifest says [N, {c}, {h}, {w}]: {fix}"
                )
        logits = outputs.get("logits", ("", None))[1] if role == "classifier" else None
        if logits and logits[-1] is not None and logits[-1] != self.manifest.num_classes:
            raise EngineMismatchError(
                f"{path} (classifier) outputs {logits[-1]} logits, "
                f"but the manifest names {self.manifest.num_classes} classes: {fix}"
            )

    @abc.abstractmethod
    def _activate_impl(self) -> None: ...

    @abc.abstractmethod
    def _enqueue_impl(self, x: np.ndarray, job: Job, *, want_x_hat: bool) -> Any: ...

    @abc.abstractmethod
    def _wait_impl(self, job: Job) -> ChainOutput: ...

    @abc.abstractmethod
    def _deactivate_impl(self) -> None: ...

    def describe(self) -> str:
        """One line saying what runs where (for logs and the CLI)."""
        return self.name


def backend_class(name: str) -> type[Backend]:
    """The backend class registered under ``name`` (imports its module on demand)."""
    if name == "onnxruntime":
        mod = importlib.import_module("ism_edge.backends.onnxruntime")
        cls: type[Backend] = mod.OnnxRuntimeBackend
        return cls
    if name == "tensorrt":
        mod = importlib.import_module("ism_edge.backends.tensorrt")
        cls = mod.TensorRTBackend
        return cls
    raise EngineError(f"unknown backend {name!r}: choose one of {', '.join(BACKEND_NAMES)} (or leave it out)")


def select_backend(requested: str | None, manifest: EngineManifest, directory: str | Path = "") -> type[Backend]:
    """Pick the backend class for an engine directory (the selection order above).

    ``requested`` is ``"tensorrt"``, ``"onnxruntime"``, ``"auto"`` or ``None`` (auto). TensorRT
    needs TensorRT engines in the directory; ONNX Runtime runs any directory (a TensorRT
    directory through its ONNX sources). Raises a one-line :class:`EngineError` or
    :class:`~ism_edge.errors.MissingDependencyError` when the request cannot be honoured.
    """
    where = f" {directory}" if str(directory) else ""
    if requested in (None, "", "auto"):
        if manifest.backend == "tensorrt":
            trt = backend_class("tensorrt")
            if trt.available():
                return trt
        return backend_class("onnxruntime")
    if requested == "tensorrt":
        if manifest.backend != "tensorrt":
            raise EngineError(
                f"engine directory{where} holds {manifest.backend} models, not TensorRT engines: "
                "rebuild it with 'ism-edge build --backend tensorrt' on the target device, or use --backend onnxruntime"
            )
        cls = backend_class("tensorrt")
        cls.check_available()
        return cls
    cls = backend_class(str(requested))
    cls.check_available()
    return cls


def load_backend(
    directory: str | Path,
    manifest: EngineManifest,
    *,
    backend: str | None = None,
    feedback_rounds: int | None = None,
    **options: Any,
) -> Backend:
    """Select, construct and activate the backend for ``directory`` (see :func:`select_backend`)."""
    cls = select_backend(backend, manifest, directory)
    instance = cls(directory, manifest, feedback_rounds=feedback_rounds, **options)
    return instance.activate()


__all__ = [
    "BACKEND_NAMES",
    "DEVICES",
    "GRAPH_IO",
    "STAGES",
    "Backend",
    "ChainOutput",
    "Job",
    "TensorInfo",
    "backend_class",
    "load_backend",
    "select_backend",
]
