"""ism_edge.cuda's decisions on CPU: what an old driver, a missing device or a failing pycuda
call turn into, and that every GPU question of the package goes through this one module.

The bindings are stand-ins here (a runtime namespace, a pycuda module); test_cuda_bindings.py runs
the same driver classes against the real bindings.
"""

from __future__ import annotations

import enum
import sys
import types
from typing import Any

import numpy as np
import pytest

from ism_edge import compat, cuda
from ism_edge.backends.tensorrt import TensorRTBackend
from ism_edge.errors import MissingDependencyError
from tests.ism_edge import fake_tensorrt as fake


class CudaErrorT(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorNotReady = 600


def runtime(driver: int, bindings: int, count: tuple[CudaErrorT, int]) -> Any:
    """A ``cuda.bindings.runtime`` stand-in: a driver of CUDA ``driver``, bindings of CUDA ``bindings``."""
    ok = CudaErrorT.cudaSuccess
    return types.SimpleNamespace(
        cudaError_t=CudaErrorT,
        cudaMemcpyKind=types.SimpleNamespace(),
        cudaGetDeviceCount=lambda: count,
        cudaDriverGetVersion=lambda: (ok, driver),
        cudaRuntimeGetVersion=lambda: (ok, bindings),
        cudaGetErrorName=lambda err: (ok, CudaErrorT(err).name.encode()),
        cudaSetDevice=lambda device: (count[0],),
    )


OLD = (CudaErrorT.cudaErrorInsufficientDriver, 0)


@pytest.mark.parametrize(
    ("driver", "bindings", "fix"),
    [
        (12020, 13000, "pip install 'cuda-python>=12.6.1,<13'"),  # cuda-python 13 on a CUDA 12 driver (JetPack 6)
        (12020, 12090, "pip install 'cuda-python>=12.2,<12.3'"),  # a driver without minor-version compatibility
        (13000, 14000, "pip install 'cuda-python>=13,<14'"),
    ],
)
def test_a_driver_older_than_the_bindings_is_reported_as_such(driver: int, bindings: int, fix: str) -> None:
    drv = cuda._CudaPythonDriver(runtime(driver, bindings, OLD))
    want = (rf"cudaErrorInsufficientDriver: the NVIDIA driver supports CUDA {driver // 1000}\.{driver % 1000 // 10}, "
            r"older")
    with pytest.raises(cuda.CudaError, match=want) as err:
        drv.device_count()
    assert fix in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(cuda.CudaError, match="cudaSetDevice failed: cudaErrorInsufficientDriver"):
        drv.push(0)


@pytest.mark.parametrize(
    ("count", "driver", "want"),
    [
        (OLD, 0, 0),  # no NVIDIA driver at all: no GPU
        ((CudaErrorT.cudaErrorNoDevice, 0), 12060, 0),
        ((CudaErrorT.cudaSuccess, 2), 12060, 2),
    ],
)
def test_no_driver_or_no_device_is_zero_gpus(count: tuple[CudaErrorT, int], driver: int, want: int) -> None:
    assert cuda._CudaPythonDriver(runtime(driver, 12090, count)).device_count() == want


def test_the_old_driver_error_reaches_the_user_instead_of_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT selection, the engine-directory check and the build all ask this module."""
    monkeypatch.setattr(cuda, "_driver", cuda._CudaPythonDriver(runtime(12020, 13000, OLD)))
    monkeypatch.setitem(sys.modules, "tensorrt", fake.tensorrt_module(fake.FakeCudaDriver()))
    with pytest.raises(cuda.CudaError, match="cudaErrorInsufficientDriver"):
        TensorRTBackend.check_available()
    with pytest.raises(cuda.CudaError, match="cudaErrorInsufficientDriver"):
        compat.current_gpu()
    assert not TensorRTBackend.available() and not cuda.available()


def test_current_gpu_is_the_cuda_modules_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "_driver", fake.FakeCudaDriver())
    assert compat.current_gpu() == {"name": "Fake GPU", "compute_capability": "8.7"}
    assert compat.current_gpu(1) is None  # the fake has one device
    monkeypatch.setattr(cuda, "_driver", None)
    monkeypatch.setitem(sys.modules, "pycuda", None)  # ISM_EDGE_CUDA is honoured: pycuda forced, not there
    monkeypatch.setenv("ISM_EDGE_CUDA", "pycuda")
    assert compat.current_gpu() is None
    monkeypatch.setenv("ISM_EDGE_CUDA", "opencl")
    with pytest.raises(cuda.CudaError, match="ISM_EDGE_CUDA"):
        compat.current_gpu()


# -- pycuda ---------------------------------------------------------------------------------------


FAILURE = "cuSomething failed: an illegal memory access was encountered"
RESULTS = {"compute_capability": (8, 7), "name": "Orin", "query": True, "time_since": 1.5}


def fake_pycuda(init_error: str | None, fail: bool) -> types.ModuleType:
    """A ``pycuda.driver`` whose ``init`` fails with ``init_error``, and every call with
    :data:`FAILURE` when ``fail``; its objects answer any method (a driver call each)."""
    drv = types.ModuleType("pycuda.driver")

    class Error(Exception):
        pass

    def op(result: Any = None) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if fail:
                raise Error(FAILURE)
            return result() if callable(result) else result

        return call

    class Handle:
        """A pycuda Device, Context, Stream, Event or allocation."""

        handle = 7
        count = staticmethod(op(1))
        pop = staticmethod(op())

        def __init__(self, *args: Any) -> None:
            op()()

        @property
        def base(self) -> Handle:
            return self

        def __int__(self) -> int:
            return 4096

        def __getattr__(self, name: str) -> Any:
            return op(RESULTS.get(name, lambda: object.__new__(Handle)))

    def init() -> None:
        if init_error:
            raise Error(init_error)

    drv.Error, drv.init, drv.Handle = Error, init, Handle  # type: ignore[attr-defined]
    drv.Device = drv.Context = drv.Stream = drv.Event = Handle  # type: ignore[attr-defined]
    drv.event_flags = types.SimpleNamespace(DISABLE_TIMING=2)  # type: ignore[attr-defined]
    drv.pagelocked_empty = op(lambda: np.zeros(8, np.uint8))  # type: ignore[attr-defined]
    drv.mem_alloc = op(lambda: object.__new__(Handle))  # type: ignore[attr-defined]
    drv.memcpy_htod_async = drv.memcpy_dtoh_async = drv.memcpy_dtod_async = op()  # type: ignore[attr-defined]
    return drv


def with_pycuda(monkeypatch: pytest.MonkeyPatch, init_error: str | None = None, fail: bool = False) -> cuda._Driver:
    module = fake_pycuda(init_error, fail)
    package = types.ModuleType("pycuda")
    package.driver = module  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", module)
    return cuda._PycudaDriver()


def pycuda_calls(handle: Any) -> dict[str, tuple[Any, ...]]:
    """Arguments for every driver method, with ``handle`` for every pycuda object."""
    return {
        "device_count": (), "device_info": (0,), "push": (0,), "pop": (), "stream_create": (),
        "stream_handle": (handle,), "stream_synchronize": (handle,), "stream_wait_event": (handle, handle),
        "stream_destroy": (handle,), "event_create": (True,), "event_record": (handle, handle),
        "event_synchronize": (handle,), "event_query": (handle,),
        "event_elapsed_ms": (handle, handle), "event_destroy": (handle,), "host_alloc": (8,), "host_free": (handle,),
        "device_alloc": (8,), "device_free": (handle,), "htod_async": (0, np.zeros(2), handle),
        "dtoh_async": (np.zeros(2), 0, handle), "dtod_async": (0, 0, 8, handle),
    }  # fmt: skip


def test_pycuda_without_a_device_is_zero_gpus_and_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    drv = with_pycuda(monkeypatch, init_error="cuInit failed: no CUDA-capable device is detected")
    assert drv.device_count() == 0
    monkeypatch.setattr(cuda, "_driver", drv)
    with pytest.raises(cuda.CudaError, match="not available"):
        cuda.device_info(0)
    with pytest.raises(cuda.CudaError, match="CUDA call cuInit failed: no CUDA-capable device is detected: check"):
        drv.stream_create()


def test_pycuda_with_a_broken_driver_raises_cuda_error_not_pycudas(monkeypatch: pytest.MonkeyPatch) -> None:
    drv = with_pycuda(monkeypatch, init_error="cuInit failed: unknown error")
    with pytest.raises(cuda.CudaError, match="cuInit failed: unknown error"):
        drv.device_count()


def test_every_pycuda_failure_is_a_cuda_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.ism_edge.test_cuda_bindings import DRIVER_METHODS

    drv = with_pycuda(monkeypatch, fail=True)
    calls = pycuda_calls(object.__new__(sys.modules["pycuda.driver"].Handle))
    assert sorted(calls) == DRIVER_METHODS
    no_cuda_call = {"stream_handle", "stream_destroy", "event_destroy"}  # pycuda frees these on collection
    for name, args in calls.items():
        if name in no_cuda_call:
            getattr(drv, name)(*args)
            continue
        with pytest.raises(cuda.CudaError, match=f"CUDA call cu.* failed: {FAILURE}: check the GPU"):
            getattr(drv, name)(*args)


def test_every_pycuda_call_returns_what_the_backend_expects(monkeypatch: pytest.MonkeyPatch) -> None:
    drv = with_pycuda(monkeypatch)
    handle = object.__new__(sys.modules["pycuda.driver"].Handle)
    out = {name: getattr(drv, name)(*args) for name, args in pycuda_calls(handle).items()}
    assert out["device_count"] == 1 and out["device_info"] == cuda.DeviceInfo(0, "Orin", "8.7")
    assert out["stream_handle"] == 7 and out["event_query"] is True and out["event_elapsed_ms"] == 1.5
    assert out["device_alloc"][0] == 4096 and out["host_alloc"][0].nbytes == 8


def test_missing_bindings_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "_driver", None)
    monkeypatch.setitem(sys.modules, "pycuda", None)
    # Submodules an earlier test imported stay cached under their full names: hide them too.
    for name in [m for m in sys.modules if m == "cuda" or m.startswith("cuda.")] + ["cuda"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delenv("ISM_EDGE_CUDA", raising=False)
    with pytest.raises(MissingDependencyError, match=r"'cuda-python'.*pip install 'ism-edge\[tensorrt\]'"):
        cuda.driver()
    assert cuda.current_gpu() is None and not cuda.available()
