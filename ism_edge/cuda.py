"""Every CUDA call of ism-edge: devices, streams, events, pinned host and device buffers.

Modelled on Polygraphy's ``polygraphy/cuda/cuda.py``: small classes (:class:`Stream`,
:class:`Event`, :class:`HostBuffer`, :class:`DeviceBuffer` with ``copy_from``/``copy_to``) over
one of two bindings, whichever imports (``ISM_EDGE_CUDA=cuda-python|pycuda`` forces one):

* cuda-python's ``cuda.bindings.runtime`` (``cuda.cudart`` on cuda-python < 12.6.1) — the CUDA
  runtime API, which is also what TensorRT uses, so both share the device's primary context.
  cuda-python 12.x needs a CUDA 12 driver (JetPack 6), 13.x a CUDA 13 driver (r580+); a driver
  older than the bindings is reported as ``cudaErrorInsufficientDriver`` with the pin to install;
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ism_edge.errors import EngineError, MissingDependencyError, missing_dependency

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


# What to pin for a driver of each CUDA major version (pyproject's tensorrt extras say the same).
CUDA_PYTHON_PINS = {12: "cuda-python>=12.6.1,<13", 13: "cuda-python>=13,<14"}


def _cuda_version(v: int) -> str:
    """CUDA's integer version (12060) as ``"12.6"``."""
    return f"{v // 1000}.{v % 1000 // 10}"


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime  # cuda-python < 12.6.1
    return runtime


def _native_handle_helper() -> Callable[[Any], Any]:
    """``cuda.bindings.utils.get_cuda_native_handle`` (cuda-bindings >= 12.9.1, where ``int(handle)``
    is deprecated), else ``int``."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int
    return get_cuda_native_handle


class _CudaPythonDriver(_Driver):
    """cuda-python's runtime API bindings; every call returns ``(cudaError_t, *results)``.

    ``cuda.bindings.runtime`` on cuda-python >= 12.6.1 (cuda-bindings 12.x and 13.x), the legacy
    ``cuda.cudart`` before (removed in 13.0). Handles are read with
    ``cuda.bindings.utils.get_cuda_native_handle`` where it exists (cuda-bindings >= 12.9.1, which
    deprecates ``int(handle)``), else with ``int``.
    """

    name = "cuda-python"

    def __init__(self, runtime: Any = None) -> None:
        """``runtime``: the bindings' runtime module (imported when None; tests pass a stand-in)."""
        cudart = _cudart() if runtime is None else runtime
        self.rt: Any = cudart
        self._native = _native_handle_helper()
        self._success = cudart.cudaError_t.cudaSuccess
        self._not_ready = cudart.cudaError_t.cudaErrorNotReady
        self._no_device = cudart.cudaError_t.cudaErrorNoDevice
        self._old_driver = cudart.cudaError_t.cudaErrorInsufficientDriver
        self._kind = cudart.cudaMemcpyKind

    def _invoke(self, what: str, fn: Callable[..., Any], *args: Any) -> tuple[Any, tuple[Any, ...]]:
        """``fn(*args)`` as ``(cudaError_t, results)``."""
        try:
            result = fn(*args)
        except RuntimeError as e:  # cuda-python < 12.8 raises "Failed to dlopen libcuda.so.1" without a driver
            raise CudaError(
                f"CUDA call {what} failed: {e}: install the NVIDIA driver, or use --backend onnxruntime"
            ) from None
        return (result[0], tuple(result[1:])) if isinstance(result, tuple) else (result, ())

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``'s result(s) when it returned ``cudaSuccess``, else :class:`CudaError`."""
        err, values = self._invoke(what, fn, *args)
        if err != self._success:
            raise CudaError(f"CUDA call {what} failed: {self._explain(err)}")
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def _error_name(self, err: Any) -> str:
        try:
            name = self.rt.cudaGetErrorName(err)[1]
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # the error name is only decoration for the message
            return str(err)

    def _versions(self) -> tuple[int, int]:
        """(the driver's CUDA version, these bindings' CUDA runtime version); 0 when unknown."""
        versions = []
        for call in (self.rt.cudaDriverGetVersion, self.rt.cudaRuntimeGetVersion):
            try:
                err, v = call()
                versions.append(int(v) if err == self._success else 0)
            except Exception:  # only decoration for the message
                versions.append(0)
        return versions[0], versions[1]

    def _explain(self, err: Any) -> str:
        """The error's name and what to do about it."""
        name = self._error_name(err)
        if err != self._old_driver:
            return f"{name}: check the GPU and driver (nvidia-smi)"
        drv, rt = self._versions()
        if drv == 0:
            return (f"{name}: no NVIDIA driver is loaded (libcuda): "
                    "install the NVIDIA driver, or use --backend onnxruntime")
        major, minor = drv // 1000, drv % 1000 // 10
        pin = CUDA_PYTHON_PINS.get(major, f"cuda-python>={major},<{major + 1}")
        if rt // 1000 == major:  # same major: this driver lacks minor-version compatibility
            pin = f"cuda-python>={major}.{minor},<{major}.{minor + 1}"
        return (
            f"{name}: the NVIDIA driver supports CUDA {_cuda_version(drv)}, older than the CUDA "
            f"{_cuda_version(rt)} runtime of the installed cuda-python: pip install '{pin}' "
            "(bindings for this driver), or update the driver"
        )

    def device_count(self) -> int:
        """GPUs visible; 0 without a device or without any NVIDIA driver. A driver that is present
        but too old for these bindings raises :class:`CudaError` naming
        ``cudaErrorInsufficientDriver`` and the cuda-python to install."""
        try:
            err, (count,) = self._invoke("cudaGetDeviceCount", self.rt.cudaGetDeviceCount)
        except CudaError:  # cuda-python < 12.8 raises when it cannot load libcuda: no driver, no GPU
            return 0
        if err == self._no_device or (err == self._old_driver and self._versions()[0] == 0):
            return 0
        if err != self._success:
            raise CudaError(f"CUDA call cudaGetDeviceCount failed: {self._explain(err)}")
        return int(count)

    def device_info(self, device: int) -> DeviceInfo:
        props = self._call("cudaGetDeviceProperties", self.rt.cudaGetDeviceProperties, device)
        raw = props.name
        name = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        return DeviceInfo(device, name.strip(), f"{props.major}.{props.minor}")

    def push(self, device: int) -> None:
        self._call("cudaSetDevice", self.rt.cudaSetDevice, device)

    def pop(self) -> None:
        return None

    def stream_create(self) -> Any:
        return self._call("cudaStreamCreateWithFlags", self.rt.cudaStreamCreateWithFlags, self.rt.cudaStreamNonBlocking)

    def stream_handle(self, stream: Any) -> int:
        return int(self._native(stream))

    def stream_synchronize(self, stream: Any) -> None:
        self._call("cudaStreamSynchronize", self.rt.cudaStreamSynchronize, stream)

    def stream_wait_event(self, stream: Any, event: Any) -> None:
        self._call("cudaStreamWaitEvent", self.rt.cudaStreamWaitEvent, stream, event, 0)

    def stream_destroy(self, stream: Any) -> None:
        self._call("cudaStreamDestroy", self.rt.cudaStreamDestroy, stream)

    def event_create(self, timing: bool) -> Any:
        flags = self.rt.cudaEventDefault if timing else self.rt.cudaEventDisableTiming
        return self._call("cudaEventCreateWithFlags", self.rt.cudaEventCreateWithFlags, flags)

    def event_record(self, event: Any, stream: Any) -> None:
        self._call("cudaEventRecord", self.rt.cudaEventRecord, event, stream)

    def event_synchronize(self, event: Any) -> None:
        self._call("cudaEventSynchronize", self.rt.cudaEventSynchronize, event)

    def event_query(self, event: Any) -> bool:
        err, _ = self._invoke("cudaEventQuery", self.rt.cudaEventQuery, event)
        if err == self._not_ready:
            return False
        if err != self._success:
            raise CudaError(f"CUDA call cudaEventQuery failed: {self._explain(err)}")
        return True

    def event_elapsed_ms(self, start: Any, end: Any) -> float:
        return float(self._call("cudaEventElapsedTime", self.rt.cudaEventElapsedTime, start, end))

    def event_destroy(self, event: Any) -> None:
        self._call("cudaEventDestroy", self.rt.cudaEventDestroy, event)

    def host_alloc(self, nbytes: int) -> tuple[np.ndarray, Any]:
        ptr = int(self._call("cudaMallocHost", self.rt.cudaMallocHost, nbytes))
        array = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)), (nbytes,))
        return array, ptr

    def host_free(self, handle: Any) -> None:
        self._call("cudaFreeHost", self.rt.cudaFreeHost, handle)

    def device_alloc(self, nbytes: int) -> tuple[int, Any]:
        ptr = int(self._call("cudaMalloc", self.rt.cudaMalloc, nbytes))
        return ptr, ptr

    def device_free(self, handle: Any) -> None:
        self._call("cudaFree", self.rt.cudaFree, handle)

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        kind = self._kind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync(HtoD)", self.rt.cudaMemcpyAsync, dst, src.ctypes.data, src.nbytes, kind, stream)

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        kind = self._kind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync(DtoH)", self.rt.cudaMemcpyAsync, dst.ctypes.data, src, dst.nbytes, kind, stream)

    def dtod_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        kind = self._kind.cudaMemcpyDeviceToDevice
        self._call("cudaMemcpyAsync(DtoD)", self.rt.cudaMemcpyAsync, dst, src, nbytes, kind, stream)


class _PycudaDriver(_Driver):
    """pycuda's driver API on each device's primary context, pushed per call (see module doc).

    Every ``pycuda.driver.Error`` becomes a :class:`CudaError`; a failed ``cuInit`` (no device, no
    usable driver) is kept and reported by the first call that needs CUDA.
    """

    name = "pycuda"

    def __init__(self) -> None:
        import pycuda.driver as drv

        self.drv: Any = drv
        self._primary: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._init_error: Exception | None = None
        try:
            drv.init()
        except drv.Error as e:
            self._init_error = e

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, with pycuda's errors (and a failed ``cuInit``) raised as :class:`CudaError`."""
        if self._init_error is not None:
            # _init_error reads "cuInit failed: …"
            raise CudaError(f"CUDA call {self._init_error}: check the GPU and driver (nvidia-smi)")
        try:
            return fn(*args)
        except self.drv.Error as e:
            raise CudaError(f"CUDA call {what} failed: {e}: check the GPU and driver (nvidia-smi)") from None

    def device_count(self) -> int:
        """GPUs visible; 0 when ``cuInit`` finds no device, :class:`CudaError` for other failures."""
        if self._init_error is not None and "no CUDA-capable device" in str(self._init_error):
            return 0
        return int(self._call("cuDeviceGetCount", self.drv.Device.count))

    def device_info(self, device: int) -> DeviceInfo:
        dev = self._call("cuDeviceGet", self.drv.Device, device)
        major, minor = self._call("cuDeviceComputeCapability", dev.compute_capability)
        return DeviceInfo(device, str(self._call("cuDeviceGetName", dev.name)), f"{major}.{minor}")

    def _primary_context(self, device: int) -> Any:
        with self._lock:
            ctx = self._primary.get(device)
            if ctx is None:
                ctx = self.drv.Device(device).retain_primary_context()
                self._primary[device] = ctx
        return ctx

    def push(self, device: int) -> None:
        ctx = self._call("cuDevicePrimaryCtxRetain", self._primary_context, device)
        self._call("cuCtxPushCurrent", ctx.push)

    def pop(self) -> None:
        self._call("cuCtxPopCurrent", self.drv.Context.pop)

    def stream_create(self) -> Any:
        return self._call("cuStreamCreate", self.drv.Stream)

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def stream_synchronize(self, stream: Any) -> None:
        self._call("cuStreamSynchronize", stream.synchronize)

    def stream_wait_event(self, stream: Any, event: Any) -> None:
        self._call("cuStreamWaitEvent", stream.wait_for_event, event)

    def stream_destroy(self, stream: Any) -> None:
        return None  # pycuda destroys the stream when the object is collected

    def event_create(self, timing: bool) -> Any:
        return self._call("cuEventCreate", self.drv.Event, 0 if timing else self.drv.event_flags.DISABLE_TIMING)

    def event_record(self, event: Any, stream: Any) -> None:
        self._call("cuEventRecord", event.record, stream)

    def event_synchronize(self, event: Any) -> None:
        self._call("cuEventSynchronize", event.synchronize)

    def event_query(self, event: Any) -> bool:
        return bool(self._call("cuEventQuery", event.query))

    def event_elapsed_ms(self, start: Any, end: Any) -> float:
        return float(self._call("cuEventElapsedTime", end.time_since, start))

    def event_destroy(self, event: Any) -> None:
        return None

    def host_alloc(self, nbytes: int) -> tuple[np.ndarray, Any]:
        array = self._call("cuMemHostAlloc", self.drv.pagelocked_empty, nbytes, np.uint8)
        return array, array

    def host_free(self, handle: Any) -> None:
        self._call("cuMemFreeHost", handle.base.free)

    def device_alloc(self, nbytes: int) -> tuple[int, Any]:
        alloc = self._call("cuMemAlloc", self.drv.mem_alloc, nbytes)
        return int(alloc), alloc

    def device_free(self, handle: Any) -> None:
        self._call("cuMemFree", handle.free)

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self._call("cuMemcpyHtoDAsync", self.drv.memcpy_htod_async, dst, src, stream)

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self._call("cuMemcpyDtoHAsync", self.drv.memcpy_dtoh_async, dst, src, stream)

    def dtod_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        self._call("cuMemcpyDtoDAsync", self.drv.memcpy_dtod_async, dst, src, nbytes, stream)


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


def current_gpu(device: int = 0) -> DeviceInfo | None:
    """GPU ``device`` as :func:`device_info` gives it, or None without CUDA bindings, a driver or
    that device. A driver that is present but unusable (``cudaErrorInsufficientDriver`` from a
    driver older than the bindings) raises :class:`CudaError` saying so, never "no GPU"."""
    try:
        drv = driver()
    except MissingDependencyError:
        return None
    if not 0 <= device < drv.device_count():
        return None
    return device_info(device)


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
