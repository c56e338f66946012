"""Every CUDA call of ism-edge: devices, streams, events, pinned host and device buffers.

Modelled on Polygraphy's ``polygraphy/cuda/cuda.py``: small classes (:class:`Stream`,
:class:`Event`, :class:`HostBuffer`, :class:`DeviceBuffer` with ``copy_from``/``copy_to``) over
one of two bindings, whichever imports (``ISM_EDGE_CUDA=cuda-python|pycuda`` forces one):

* cuda-python's ``cuda.bindings.runtime`` (``cuda.cudart`` on cuda-python < 12.6) — the CUDA
  runtime API, which is also what TensorRT uses, so both share the device's primary context;
* pycuda's driver API, on the device's *primary* context (``retain_primary_context``), which
  is the context TensorRT's runtime API binds to as well.

Contexts are per thread. A pycuda context is current only in the thread that pushed it, so every
public entry point of the TensorRT backend runs inside :func:`device_context`, which pushes the
primary context for the duration of the call and pops it after (a ROS 2 executor may call a
node's callback from any thread); with cuda-python it selects the device with ``cudaSetDevice``.
Objects created here must be released (``close``) inside :func:`device_context` too.

Nothing here is imported by ``import ism_edge``; the bindings are imported on first use and a
missing one raises :class:`~ism_edge.errors.MissingDependencyError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ism_edge.errors import EngineError, missing_dependency

BINDINGS = ("cuda-python", "pycuda")


class CudaError(EngineError):
    """A CUDA call failed (no driver or device, out of memory, a launch failure)."""


@dataclass(frozen=True)
class DeviceInfo:
    """Name and compute capability (``"8.7"``) of one GPU, as engine manifests record them."""

    index: int
    name: str
    compute_capability: str


class _Driver:
    """The operations ism-edge needs, implemented over one set of bindings."""

    name = ""

    def device_count(self) -> int:
        raise NotImplementedError

    def device_info(self, device: int) -> DeviceInfo:
        raise NotImplementedError

    def push(self, device: int) -> None:
        raise NotImplementedError

    def pop(self) -> None:
        raise NotImplementedError

    def stream_create(self) -> Any:
        raise NotImplementedError

    def stream_handle(self, stream: Any) -> int:
        raise NotImplementedError

    def stream_synchronize(self, stream: Any) -> None:
        raise NotImplementedError

    def stream_wait_event(self, stream: Any, event: Any) -> None:
        raise NotImplementedError

    def stream_destroy(self, stream: Any) -> None:
        raise NotImplementedError

    def event_create(self, timing: bool) -> Any:
        raise NotImplementedError

    def event_record(self, event: Any, stream: Any) -> None:
        raise NotImplementedError

    def event_synchronize(self, event: Any) -> None:
        raise NotImplementedError

    def event_query(self, event: Any) -> bool:
        raise NotImplementedError

    def event_elapsed_ms(self, start: Any, end: Any) -> float:
        raise NotImplementedError

    def event_destroy(self, event: Any) -> None:
        raise NotImplementedError

    def host_alloc(self, nbytes: int) -> tuple[np.ndarray, Any]:
        """Page-locked host memory as a uint8 array, plus the handle that frees it."""
        raise NotImplementedError

    def host_free(self, handle: Any) -> None:
        raise NotImplementedError

    def device_alloc(self, nbytes: int) -> tuple[int, Any]:
        """Device memory: its address, plus the handle that frees it."""
        raise NotImplementedError

    def device_free(self, handle: Any) -> None:
        raise NotImplementedError

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        raise NotImplementedError

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        raise NotImplementedError

    def dtod_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        raise NotImplementedError


class _CudaPythonDriver(_Driver):
    """cuda-python's runtime API bindings; every call returns ``(cudaError_t, *results)``."""

    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6
        self.rt: Any = cudart
        self._success = cudart.cudaError_t.cudaSuccess
        self._not_ready = cudart.cudaError_t.cudaErrorNotReady
        self._kind = cudart.cudaMemcpyKind

    def _check(self, result: Any, what: str) -> Any:
        if isinstance(result, tuple):
            err, values = result[0], result[1:]
        else:
            err, values = result, ()
        if err != self._success:
            raise CudaError(f"CUDA call {what} failed: {self._error_name(err)}: check the GPU and driver (nvidia-smi)")
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def _error_name(self, err: Any) -> str:
        try:
            name = self.rt.cudaGetErrorName(err)[1]
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # the error name is only decoration for the message
            return str(err)

    def device_count(self) -> int:
        err, count = self.rt.cudaGetDeviceCount()
        return int(count) if err == self._success else 0

    def device_info(self, device: int) -> DeviceInfo:
        props = self._check(self.rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        raw = props.name
        name = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        return DeviceInfo(device, name.strip(), f"{props.major}.{props.minor}")

    def push(self, device: int) -> None:
        self._check(self.rt.cudaSetDevice(device), "cudaSetDevice")

    def pop(self) -> None:
        return None

    def stream_create(self) -> Any:
        return self._check(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def stream_synchronize(self, stream: Any) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def stream_wait_event(self, stream: Any, event: Any) -> None:
        self._check(self.rt.cudaStreamWaitEvent(stream, event, 0), "cudaStreamWaitEvent")

    def stream_destroy(self, stream: Any) -> None:
        self._check(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def event_create(self, timing: bool) -> Any:
        flags = self.rt.cudaEventDefault if timing else self.rt.cudaEventDisableTiming
        return self._check(self.rt.cudaEventCreateWithFlags(flags), "cudaEventCreateWithFlags")

    def event_record(self, event: Any, stream: Any) -> None:
        self._check(self.rt.cudaEventRecord(event, stream), "cudaEventRecord")

    def event_synchronize(self, event: Any) -> None:
        self._check(self.rt.cudaEventSynchronize(event), "cudaEventSynchronize")

    def event_query(self, event: Any) -> bool:
        result = self.rt.cudaEventQuery(event)
        err = result[0] if isinstance(result, tuple) else result
        if err == self._not_ready:
            return False
        self._check(result, "cudaEventQuery")
        return True

    def event_elapsed_ms(self, start: Any, end: Any) -> float:
        return float(self._check(self.rt.cudaEventElapsedTime(start, end), "cudaEventElapsedTime"))

    def event_destroy(self, event: Any) -> None:
        self._check(self.rt.cudaEventDestroy(event), "cudaEventDestroy")

    def host_alloc(self, nbytes: int) -> tuple[np.ndarray, Any]:
        ptr = int(self._check(self.rt.cudaMallocHost(nbytes), "cudaMallocHost"))
        array = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)), (nbytes,))
        return array, ptr

    def host_free(self, handle: Any) -> None:
        self._check(self.rt.cudaFreeHost(handle), "cudaFreeHost")

    def device_alloc(self, nbytes: int) -> tuple[int, Any]:
        ptr = int(self._check(self.rt.cudaMalloc(nbytes), "cudaMalloc"))
        return ptr, ptr

    def device_free(self, handle: Any) -> None:
        self._check(self.rt.cudaFree(handle), "cudaFree")

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        kind = self._kind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream), "cudaMemcpyAsync(HtoD)")

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        kind = self._kind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream), "cudaMemcpyAsync(DtoH)")

    def dtod_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        kind = self._kind.cudaMemcpyDeviceToDevice
        self._check(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync(DtoD)")


class _PycudaDriver(_Driver):
    """pycuda's driver API on each device's primary context, pushed per call (see module doc)."""

    name = "pycuda"

    def __init__(self) -> None:
        import pycuda.driver as drv

        drv.init()
        self.drv: Any = drv
        self._primary: dict[int, Any] = {}
        self._lock = threading.Lock()

    def _wrap(self, what: str, err: Exception) -> CudaError:
        return CudaError(f"CUDA call {what} failed: {err}: check the GPU and driver (nvidia-smi)")

    def device_count(self) -> int:
        try:
            return int(self.drv.Device.count())
        except self.drv.Error:
            return 0

    def device_info(self, device: int) -> DeviceInfo:
        dev = self.drv.Device(device)
        major, minor = dev.compute_capability()
        return DeviceInfo(device, str(dev.name()), f"{major}.{minor}")

    def push(self, device: int) -> None:
        with self._lock:
            ctx = self._primary.get(device)
            if ctx is None:
                ctx = self.drv.Device(device).retain_primary_context()
                self._primary[device] = ctx
        ctx.push()

    def pop(self) -> None:
        self.drv.Context.pop()

    def stream_create(self) -> Any:
        return self.drv.Stream()

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def stream_synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def stream_wait_event(self, stream: Any, event: Any) -> None:
        stream.wait_for_event(event)

    def stream_destroy(self, stream: Any) -> None:
        return None  # pycuda destroys the stream when the object is collected

    def event_create(self, timing: bool) -> Any:
        return self.drv.Event(0 if timing else self.drv.event_flags.DISABLE_TIMING)

    def event_record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def event_synchronize(self, event: Any) -> None:
        event.synchronize()

    def event_query(self, event: Any) -> bool:
        return bool(event.query())

    def event_elapsed_ms(self, start: Any, end: Any) -> float:
        return float(end.time_since(start))

    def event_destroy(self, event: Any) -> None:
        return None

    def host_alloc(self, nbytes: int) -> tuple[np.ndarray, Any]:
        array = self.drv.pagelocked_empty(nbytes, np.uint8)
        return array, array

    def host_free(self, handle: Any) -> None:
        handle.base.free()

    def device_alloc(self, nbytes: int) -> tuple[int, Any]:
        try:
            alloc = self.drv.mem_alloc(nbytes)
        except self.drv.Error as e:
            raise self._wrap("cuMemAlloc", e) from None
        return int(alloc), alloc

    def device_free(self, handle: Any) -> None:
        handle.free()

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self.drv.memcpy_htod_async(dst, src, stream)

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self.drv.memcpy_dtoh_async(dst, src, stream)

    def dtod_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        self.drv.memcpy_dtod_async(dst, src, nbytes, stream)


_driver: _Driver | None = None
_driver_lock = threading.Lock()


def _load(binding: str) -> _Driver:
    if binding == "cuda-python":
        return _CudaPythonDriver()
    return _PycudaDriver()


def driver() -> _Driver:
    """The CUDA bindings in use: cuda-python if it imports, else pycuda (cached, thread-safe).

    ``ISM_EDGE_CUDA=cuda-python`` or ``=pycuda`` forces one. Raises
    :class:`~ism_edge.errors.MissingDependencyError` when neither is installed.
    """
    global _driver
    with _driver_lock:
        if _driver is not None:
            return _driver
        forced = os.environ.get("ISM_EDGE_CUDA", "").strip().lower()
        if forced and forced not in BINDINGS:
            raise CudaError(f"ISM_EDGE_CUDA={forced!r} is not one of {', '.join(BINDINGS)}: unset it or pick one")
        for binding in (forced,) if forced else BINDINGS:
            try:
                _driver = _load(binding)
                return _driver
            except ImportError:
                continue
        raise missing_dependency(
            forced or "cuda-python", "tensorrt", "the TensorRT backend (CUDA streams and buffers)"
        )


def available() -> bool:
    """True when CUDA bindings import and at least one GPU answers."""
    try:
        return driver().device_count() > 0
    except Exception:  # a broken driver install reads as "no CUDA" here; activation reports it
        return False


def device_count() -> int:
    return driver().device_count()


def device_info(device: int = 0) -> DeviceInfo:
    """Name and compute capability of ``device`` (what ``ism-edge build`` records)."""
    with device_context(device):
        return driver().device_info(device)


@contextlib.contextmanager
def device_context(device: int = 0) -> Iterator[_Driver]:
    """Make ``device``'s primary context current in this thread for the ``with`` body."""
    drv = driver()
    count = drv.device_count()
    if not 0 <= device < count:
        raise CudaError(
            f"CUDA device {device} is not available ({count} device(s) visible): check nvidia-smi and "
            "CUDA_VISIBLE_DEVICES, or use --backend onnxruntime"
        )
    drv.push(device)
    try:
        yield drv
    finally:
        drv.pop()


class Stream:
    """A non-blocking CUDA stream; ``handle`` is what ``execute_async_v3`` takes."""

    def __init__(self) -> None:
        self._drv = driver()
        self._stream: Any = self._drv.stream_create()

    @property
    def raw(self) -> Any:
        return self._stream

    @property
    def handle(self) -> int:
        return self._drv.stream_handle(self._stream)

    def synchronize(self) -> None:
        self._drv.stream_synchronize(self._stream)

    def wait(self, event: Event) -> None:
        """Make later work on this stream wait for ``event`` (no host blocking)."""
        self._drv.stream_wait_event(self._stream, event.raw)

    def close(self) -> None:
        if self._stream is not None:
            self._drv.stream_destroy(self._stream)
            self._stream = None


class Event:
    """A CUDA event; with ``timing`` two events give the GPU time between them."""

    def __init__(self, timing: bool = True) -> None:
        self._drv = driver()
        self._event: Any = self._drv.event_create(timing)

    @property
    def raw(self) -> Any:
        return self._event

    def record(self, stream: Stream) -> None:
        self._drv.event_record(self._event, stream.raw)

    def synchronize(self) -> None:
        self._drv.event_synchronize(self._event)

    def done(self) -> bool:
        return self._drv.event_query(self._event)

    def elapsed_ms(self, start: Event) -> float:
        """Milliseconds of GPU time from ``start`` to this event (both recorded and complete)."""
        return self._drv.event_elapsed_ms(start.raw, self._event)

    def close(self) -> None:
        if self._event is not None:
            self._drv.event_destroy(self._event)
            self._event = None


def _nbytes(shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


class HostBuffer:
    """Page-locked (pinned) host memory viewed as a numpy array of ``shape`` and ``dtype``.

    Pinned memory is what lets ``cudaMemcpyAsync`` run asynchronously and overlap compute.
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any = np.float32) -> None:
        self._drv = driver()
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.nbytes = _nbytes(self.shape, self.dtype)
        raw, self._handle = self._drv.host_alloc(max(self.nbytes, 1))
        self.array: np.ndarray = raw[: self.nbytes].view(self.dtype).reshape(self.shape)

    def close(self) -> None:
        if self._handle is not None:
            self._drv.host_free(self._handle)
            self._handle = None


class DeviceBuffer:
    """Device memory for an array of ``shape`` and ``dtype``; axis 0 is the batch."""

    def __init__(self, shape: tuple[int, ...], dtype: Any = np.float32) -> None:
        self._drv = driver()
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.nbytes = _nbytes(self.shape, self.dtype)
        self.row_bytes = self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes
        self.ptr, self._handle = self._drv.device_alloc(max(self.nbytes, 1))

    def address(self, row: int = 0) -> int:
        """Device address of batch item ``row``."""
        return self.ptr + row * self.row_bytes

    def copy_from(self, src: np.ndarray | HostBuffer, stream: Stream, rows: int | None = None) -> None:
        """Asynchronously copy the first ``rows`` batch items from pinned host memory."""
        host = src.array if isinstance(src, HostBuffer) else src
        n = self.shape[0] if rows is None else rows
        self._drv.htod_async(self.ptr, host.reshape(-1).view(np.uint8)[: n * self.row_bytes], stream.raw)

    def copy_to(self, dst: np.ndarray | HostBuffer, stream: Stream, rows: int | None = None) -> None:
        """Asynchronously copy the first ``rows`` batch items to pinned host memory."""
        host = dst.array if isinstance(dst, HostBuffer) else dst
        n = self.shape[0] if rows is None else rows
        self._drv.dtoh_async(host.reshape(-1).view(np.uint8)[: n * self.row_bytes], self.ptr, stream.raw)

    def copy_rows_from(self, src: DeviceBuffer, start: int, stop: int, stream: Stream) -> None:
        """Asynchronously copy batch items ``start:stop`` of ``src`` into the same rows here."""
        if src.row_bytes != self.row_bytes:
            raise ValueError("device buffers have different row sizes")
        self._drv.dtod_async(self.address(start), src.address(start), (stop - start) * self.row_bytes, stream.raw)

    def close(self) -> None:
        if self._handle is not None:
            self._drv.device_free(self._handle)
            self._handle = None
