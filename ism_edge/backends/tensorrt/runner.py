"""TensorRT backend: the defense chain on three engines with one CUDA stream each.

Written against the TensorRT 10 Python API (``execute_async_v3``, tensor addresses set by name,
I/O discovered from the engine) and :mod:`ism_edge.cuda` (every CUDA call). Buffers are allocated
once on activation for the engines' maximum batch; nothing is allocated per frame.

Schedule of one job (slot *s* of a ring of two pinned input/output slots)::

    upload stream      H2D x → in[s] ─ev_uploaded─┐
    classifier stream  wait(ev_uploaded) C(in[s]) → logits_raw ‖ wait(ev_mapped) C(x̂) → logits_reformed ─ev_classified─┐
    mapper stream      wait(ev_uploaded) M(in[s]) → x̂, recon [feedback rounds] ─ev_mapped─┐
    perturbation stream                       wait(ev_mapped) P(in[s], x̂) → p_score ‖ wait(ev_classified)
                                              D2H recon, logits, p (x̂ on request) → out[s] ─ev_done─

C on the raw frame runs concurrently with M; the second C pass and P read M's output buffer in
place (no host round trip). The compute of job k+1 waits for ``ev_done`` of job k (the device
intermediates are shared), but its upload does not, so job k+1's upload overlaps job k's
compute: the runtime enqueues k+1 before it waits for k. Feedback rounds need one host decision
per round (which samples are still above the threshold: N floats downloaded), so they make
``enqueue`` wait for the mapper; C(x) is enqueued before M for that reason, so it still overlaps
M and its rounds, and the replaced samples are copied device to device.

Before anything is queued, ``enqueue`` sets the batch of all three engines and checks every
output's shape (``get_tensor_shape``) against the buffer it is written to, so an engine with
another class count is refused instead of writing past ``logits_*``. A batch below the
optimization profile's minimum is padded with zero images up to it (their outputs are dropped).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ism_edge import _checks as check
from ism_edge import cuda
from ism_edge.backends import Backend, ChainOutput, Job, TensorInfo
from ism_edge.backends.tensorrt.loader import tensorrt_module
from ism_edge.errors import EngineError, EngineMismatchError
from ism_edge.manifest import ROLES, EngineManifest

if TYPE_CHECKING:
    import tensorrt as trt

SLOTS = 2


def _dims(d: trt.Dims) -> tuple[int, ...]:
    return tuple(int(d[i]) for i in range(len(d)))


class _Engine:
    """One deserialized engine, its execution context and its I/O tensors (found by name).

    ``out_rows``: the per-sample shape of each output's buffer (``logits``: ``(classes,)``);
    ``check_io(inputs, outputs)`` refuses I/O that disagrees with the manifest
    (:meth:`Backend._check_io <ism_edge.backends.Backend._check_io>`).
    """

    def __init__(
        self,
        trt_mod: Any,
        runtime: trt.Runtime,
        path: Path,
        role: str,
        manifest: EngineManifest,
        out_rows: dict[str, tuple[int, ...]],
        check_io: Callable[[TensorInfo, TensorInfo], None],
    ) -> None:
        self.role = role
        self.path = path
        self._out_rows = out_rows
        fix = "rebuild the engines with 'ism-edge build' on this device"
        try:
            data = path.read_bytes()
        except OSError as e:
            raise EngineError(f"{path} ({role}) cannot be read ({e.strerror}): {fix}") from None
        engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise EngineMismatchError(
                f"{path} ({role}) cannot be deserialized by TensorRT {trt_mod.__version__}: it was built "
                f"with another TensorRT version or for another GPU, or it is corrupt; {fix}"
            )
        self.engine: trt.ICudaEngine = engine
        context: trt.IExecutionContext | None = engine.create_execution_context()
        if context is None:
            raise EngineError(f"{path} ({role}): TensorRT could not create an execution context (out of GPU memory?)")
        self.context: trt.IExecutionContext = context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt_mod.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt_mod.TensorIOMode.OUTPUT]

        def dtype(name: str) -> str:
            d = engine.get_tensor_dtype(name)
            return "float32" if d == trt_mod.DataType.FLOAT else str(d)

        # every I/O tensor needs an address, so no extra outputs; output shapes are checked per batch (set_batch)
        check_io({n: (dtype(n), _dims(engine.get_tensor_shape(n))) for n in self.inputs},
                 {n: (dtype(n), None) for n in self.outputs})
        c, h, w = manifest.input_shape
        profile = engine.get_tensor_profile_shape(self.inputs[0], 0)
        self.min_batch = _dims(profile[0])[0]
        self.max_batch = _dims(profile[2])[0]
        self._batch = -1
        self._chw = (c, h, w)

    def set_batch(self, n: int) -> None:
        """Set every input's shape to batch ``n`` and check that every output then has the shape
        of its buffer, ``(n, *out_rows[name])`` (skipped when unchanged). Queues nothing."""
        if n == self._batch:
            return
        for name in self.inputs:
            if not self.context.set_input_shape(name, (n, *self._chw)):
                raise EngineError(f"{self.path} ({self.role}): batch {n} is outside the engine's profile "
                                  f"[{self.min_batch}, {self.max_batch}]")
        for name in self.outputs:
            got = _dims(self.context.get_tensor_shape(name))
            want = (n, *self._out_rows[name])
            if got != want:
                raise EngineMismatchError(
                    f"{self.path} ({self.role}) output {name!r} has shape {list(got)} at batch {n}, but the manifest's "
                    f"shapes give {list(want)}: the engine directory is inconsistent; rebuild it with 'ism-edge build'"
                )
        self._batch = n

    def bind(self, addresses: dict[str, int]) -> None:
        """Point tensors at device memory; used by the next ``execute``."""
        for name, ptr in addresses.items():
            if not self.context.set_tensor_address(name, ptr):
                raise EngineError(f"{self.path} ({self.role}): TensorRT refused the address of tensor {name!r}")

    def execute(self, stream: cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.handle):
            raise EngineError(
                f"{self.path} ({self.role}): TensorRT failed to enqueue the engine (see the TensorRT log above)"
            )


@dataclass
class _Slot:
    """Pinned host input/output buffers, the device input and the events of one in-flight job."""

    host_in: cuda.HostBuffer
    dev_in: cuda.DeviceBuffer
    host_out: dict[str, cuda.HostBuffer]
    events: dict[str, cuda.Event]
    busy: bool = False
    want_x_hat: bool = False
    rounds: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    host_ms: dict[str, float] = field(default_factory=dict)

    def close(self) -> None:
        self.dev_in.close()
        for b in (self.host_in, *self.host_out.values()):
            b.close()
        for e in self.events.values():
            e.close()


_EVENTS = (
    "upload_start", "uploaded", "map_start", "mapped", "clf_start", "clf_raw_end", "clf_ref_start",
    "classified", "p_start", "p_end", "download_start", "done",
)  # fmt: skip


class TensorRTBackend(Backend):
    """The defense chain on TensorRT engines (see the module docstring for the schedule).

    ``device``: ``"auto"``/``"cuda"`` (GPU 0) or ``"cuda:N"``. Not thread-safe: call it from one
    thread at a time (``DefenseRuntime`` holds a lock); any thread works, the CUDA context is
    made current per call.
    """

    name = "tensorrt"
    max_in_flight = SLOTS
    devices = ("auto", "cuda")
    device_hint = " (it runs on a GPU; use --backend onnxruntime for the CPU)"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """The arguments of :meth:`Backend.__init__ <ism_edge.backends.Backend.__init__>`."""
        super().__init__(*args, **kwargs)
        self.gpu = check.cuda_index(self.device) or 0
        self.engine_files = {role: self.directory / self.manifest.engines[role].file for role in ROLES}
        self._engines: dict[str, _Engine] = {}
        self._streams: dict[str, cuda.Stream] = {}
        self._dev: dict[str, cuda.DeviceBuffer] = {}
        self._h_residual: cuda.HostBuffer | None = None
        self._slots: list[_Slot] = []
        self._next_slot = 0
        self._last_done: cuda.Event | None = None
        self._runtime: Any = None
        self._logger: Any = None
        self._max_batch = int(self.manifest.batch.get("max", 1))
        self._min_batch = 1

    @classmethod
    def check_available(cls) -> None:
        tensorrt_module()
        cuda.driver()
        if cuda.device_count() < 1:
            raise cuda.CudaError(
                "the TensorRT backend needs an NVIDIA GPU, but CUDA reports none: "
                "check nvidia-smi, or use --backend onnxruntime"
            )

    @property
    def max_batch(self) -> int:
        return self._max_batch

    def describe(self) -> str:
        trt_mod = tensorrt_module()
        info = cuda.device_info(self.gpu)
        return f"tensorrt {trt_mod.__version__} on {info.name} (sm {info.compute_capability}, {cuda.driver().name})"

    # -- lifecycle ------------------------------------------------------------------------------
    def _activate_impl(self) -> None:
        trt_mod = tensorrt_module()
        with cuda.device_context(self.gpu):
            try:
                self._allocate(trt_mod)
            except BaseException:
                self._release()
                raise

    def _allocate(self, trt_mod: Any) -> None:
        self._logger = trt_mod.Logger(trt_mod.Logger.WARNING)
        self._runtime = trt_mod.Runtime(self._logger)
        (c, h, w), k = self.manifest.input_shape, self.manifest.num_classes
        out_rows = {"x_hat": (c, h, w), "recon_error": (), "logits": (k,), "p_score": ()}
        for role, path in self.engine_files.items():
            if not path.is_file():
                raise EngineError(f"{path} ({role}) is missing: rebuild the engines with 'ism-edge build'")
            def check_io(inputs: TensorInfo, outputs: TensorInfo, role: str = role, path: Path = path) -> None:
                self._check_io(role, path, inputs, outputs)

            self._engines[role] = _Engine(trt_mod, self._runtime, path, role, self.manifest, out_rows, check_io)
        self._max_batch = min(self._max_batch, *(e.max_batch for e in self._engines.values()))
        self._min_batch = max(e.min_batch for e in self._engines.values())
        if self._min_batch > self._max_batch:
            raise EngineMismatchError(
                f"{self.directory}: the engines' batch profiles leave no batch size (min {self._min_batch} > max "
                f"{self._max_batch}, manifest max {self.manifest.batch.get('max')}): rebuild them with 'ism-edge build'"
            )
        for engine in self._engines.values():  # the output shapes are checked once here, before any frame
            engine.set_batch(self._max_batch)
        for name in ("upload", *ROLES):
            self._streams[name] = cuda.Stream()
        b, (c, h, w), k = self._max_batch, self.manifest.input_shape, self.manifest.num_classes
        self._dev = {
            "x_hat": cuda.DeviceBuffer((b, c, h, w)),
            "recon_error": cuda.DeviceBuffer((b,)),
            "x_hat_again": cuda.DeviceBuffer((b, c, h, w)),
            "residual": cuda.DeviceBuffer((b,)),
            "logits_raw": cuda.DeviceBuffer((b, k)),
            "logits_reformed": cuda.DeviceBuffer((b, k)),
            "p_score": cuda.DeviceBuffer((b,)),
        }
        self._h_residual = cuda.HostBuffer((b,))
        for _ in range(SLOTS):
            self._slots.append(
                _Slot(
                    host_in=cuda.HostBuffer((b, c, h, w)),
                    dev_in=cuda.DeviceBuffer((b, c, h, w)),
                    host_out={
                        "recon_error": cuda.HostBuffer((b,)),
                        "logits_raw": cuda.HostBuffer((b, k)),
                        "logits_reformed": cuda.HostBuffer((b, k)),
                        "p_score": cuda.HostBuffer((b,)),
                        "x_hat": cuda.HostBuffer((b, c, h, w)),
                    },
                    events={name: cuda.Event(timing=True) for name in _EVENTS},
                )
            )

    def _deactivate_impl(self) -> None:
        with cuda.device_context(self.gpu):
            for stream in self._streams.values():
                stream.synchronize()
            self._release()

    def _release(self) -> None:
        for slot in self._slots:
            slot.close()
        for buf in self._dev.values():
            buf.close()
        if self._h_residual is not None:
            self._h_residual.close()
        for stream in self._streams.values():
            stream.close()
        self._slots, self._dev, self._streams, self._h_residual = [], {}, {}, None
        self._engines.clear()
        self._runtime = None
        self._last_done = None

    # -- inference ------------------------------------------------------------------------------
    def _enqueue_impl(self, x: np.ndarray, job: Job, *, want_x_hat: bool) -> int:
        index = self._next_slot
        slot = self._slots[index]
        if slot.busy:
            raise RuntimeError("TensorRT backend: both slots are in flight; wait() for a job first")
        n = job.batch
        rows = max(n, self._min_batch)  # a batch below the profile's minimum runs padded with zero images
        with cuda.device_context(self.gpu):
            for engine in self._engines.values():  # refuses a bad batch or output shape before anything is queued
                engine.set_batch(rows)
            t0 = time.perf_counter()
            np.copyto(slot.host_in.array[:n], x)
            slot.host_in.array[n:rows] = 0.0
            slot.host_ms = {"upload": (time.perf_counter() - t0) * 1e3}
            self._schedule(slot, n, rows, want_x_hat)
        slot.busy = True
        slot.want_x_hat = want_x_hat
        self._next_slot = (index + 1) % SLOTS
        return index

    def _schedule(self, slot: _Slot, n: int, rows: int, want_x_hat: bool) -> None:
        """Queue the job's work (``rows`` >= ``n`` images on the device, ``n`` downloaded); the
        engines' batch is already ``rows``."""
        ev, s, d = slot.events, self._streams, self._dev
        mapper, classifier, perturbation = (self._engines[r] for r in ROLES)

        # Upload: overlaps the previous job's compute (no wait on its ev_done).
        ev["upload_start"].record(s["upload"])
        slot.dev_in.copy_from(slot.host_in, s["upload"], rows=rows)
        ev["uploaded"].record(s["upload"])

        for name in ROLES:
            s[name].wait(ev["uploaded"])
            if self._last_done is not None:
                s[name].wait(self._last_done)

        # Classifier on the raw input first: it needs only the upload, so it runs concurrently with
        # the mapper even when the feedback rounds below make the host wait for the mapper.
        ev["clf_start"].record(s["classifier"])
        classifier.bind({"x": slot.dev_in.ptr, "logits": d["logits_raw"].ptr})
        classifier.execute(s["classifier"])
        ev["clf_raw_end"].record(s["classifier"])

        # Mapping network (+ feedback rounds) on its own stream.
        ev["map_start"].record(s["mapper"])
        mapper.bind({"x": slot.dev_in.ptr, "x_hat": d["x_hat"].ptr, "recon_error": d["recon_error"].ptr})
        mapper.execute(s["mapper"])
        slot.rounds = self._feedback(n) if self.feedback_rounds else np.zeros(n, dtype=np.int32)
        ev["mapped"].record(s["mapper"])

        # Classifier on x̂ once it exists.
        s["classifier"].wait(ev["mapped"])
        ev["clf_ref_start"].record(s["classifier"])
        classifier.bind({"x": d["x_hat"].ptr, "logits": d["logits_reformed"].ptr})
        classifier.execute(s["classifier"])
        ev["classified"].record(s["classifier"])

        # Perturbation classifier on (x, x̂), then every download on the same stream.
        s["perturbation"].wait(ev["mapped"])
        ev["p_start"].record(s["perturbation"])
        perturbation.bind({"x": slot.dev_in.ptr, "x_hat": d["x_hat"].ptr, "p_score": d["p_score"].ptr})
        perturbation.execute(s["perturbation"])
        ev["p_end"].record(s["perturbation"])
        s["perturbation"].wait(ev["classified"])
        ev["download_start"].record(s["perturbation"])
        for name in ("recon_error", "logits_raw", "logits_reformed", "p_score"):
            d[name].copy_to(slot.host_out[name], s["perturbation"], rows=n)
        if want_x_hat:
            d["x_hat"].copy_to(slot.host_out["x_hat"], s["perturbation"], rows=n)
        ev["done"].record(s["perturbation"])
        self._last_done = ev["done"]

    def _feedback(self, n: int) -> np.ndarray:
        """Feedback reformation on the mapper stream: x̂ ← M(x̂) for samples still above threshold.

        Same rule as ``ism_edge_training.defense.Defense.reform``; the mapper's ``recon_error`` output on
        input x̂ is exactly ‖x̂ − M(x̂)‖₁/(CHW). Replaced samples are copied device to device. Only
        the first ``n`` samples count (padding rows beyond them are re-mapped but never decided on).
        """
        assert self._h_residual is not None
        residual = self._h_residual
        mapper, stream, d = self._engines["mapper"], self._streams["mapper"], self._dev

        def remap(active: np.ndarray) -> np.ndarray:  # the whole batch: cheaper than gathering rows on the device
            mapper.bind({"x": d["x_hat"].ptr, "x_hat": d["x_hat_again"].ptr, "recon_error": d["residual"].ptr})
            mapper.execute(stream)
            d["residual"].copy_to(residual, stream, rows=n)
            stream.synchronize()
            return residual.array[:n][active]

        def replace(rows: np.ndarray, still: np.ndarray) -> None:
            mask = np.zeros(n, dtype=bool)
            mask[rows] = True
            for start, stop in _runs(mask):
                d["x_hat"].copy_rows_from(d["x_hat_again"], start, stop, stream)

        return self._reform(n, remap, replace)

    def _done_impl(self, job: Job) -> bool:
        with cuda.device_context(self.gpu):
            return self._slots[int(job.payload)].events["done"].done()

    def _wait_impl(self, job: Job) -> ChainOutput:
        slot = self._slots[int(job.payload)]
        n = job.batch
        with cuda.device_context(self.gpu):
            slot.events["done"].synchronize()
            ev = slot.events
            t = {
                "upload": slot.host_ms.get("upload", 0.0) + ev["uploaded"].elapsed_ms(ev["upload_start"]),
                "mapping": ev["mapped"].elapsed_ms(ev["map_start"]),
                "classifier": (
                    ev["clf_raw_end"].elapsed_ms(ev["clf_start"]) + ev["classified"].elapsed_ms(ev["clf_ref_start"])
                ),
                "detectors": ev["p_end"].elapsed_ms(ev["p_start"]),
                "download": ev["done"].elapsed_ms(ev["download_start"]),
            }
            out = slot.host_out
            result = ChainOutput(
                recon_error=out["recon_error"].array[:n].copy(),
                logits_raw=out["logits_raw"].array[:n].copy(),
                logits_reformed=out["logits_reformed"].array[:n].copy(),
                p_score=out["p_score"].array[:n].copy(),
                rounds=slot.rounds,
                x_hat=out["x_hat"].array[:n].copy() if slot.want_x_hat else None,
                timings_ms=t,
            )
        slot.busy = False
        return result


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs [start, stop) of True in a 1-D boolean mask (fewer device copies)."""
    padded = np.concatenate([[False], mask.astype(bool), [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]
