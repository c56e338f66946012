"""Every CUDA driver method of ism_edge.cuda against the real bindings, on any machine.

Without a GPU (or without any NVIDIA driver) the bindings still import and every call still goes
through them, returning an error code; so each method must return or raise the project's
:class:`~ism_edge.cuda.CudaError` — a ``TypeError`` or ``AttributeError`` here is a signature
that drifted between binding versions (cuda-bindings 12.x and 13.x, pycuda). The calls get the
argument types the backend passes: handles the driver created, or, where creating one failed,
the bindings' own null handles. Run it against another version with
``pip install --target DIR 'cuda-bindings==13.*'`` and ``PYTHONPATH=DIR pytest tests/ism_edge/test_cuda_bindings.py``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from ism_edge import cuda

DRIVER_METHODS = sorted(
    name for name, member in vars(cuda._Driver).items() if callable(member) and not name.startswith("_")
)

RETURNS: dict[str, type] = {"device_count": int, "stream_handle": int, "event_query": bool, "event_elapsed_ms": float}


def _bindings_version() -> str:
    try:
        from cuda import bindings
    except ImportError:
        return "cuda.cudart (cuda-python < 12.6.1)"
    return f"cuda-bindings {getattr(bindings, '__version__', '?')}"


def _cuda_python() -> tuple[cuda._Driver, Any]:
    try:
        drv = cuda._CudaPythonDriver()
    except ImportError:
        pytest.skip("cuda-python (cuda-bindings) is not installed")
    return drv, drv.rt


def _pycuda() -> tuple[cuda._Driver, Any]:
    try:
        drv = cuda._PycudaDriver()
    except ImportError:
        pytest.skip("pycuda is not installed (it needs the CUDA toolkit to build and libcuda to import)")
    return drv, None


def _or_null(make: Callable[[], Any], null: Callable[[], Any] | None) -> Any:
    """What ``make`` creates, else the bindings' null handle (None where there is no such thing)."""
    try:
        return make()
    except cuda.CudaError:
        return null() if null is not None else None


def exercise(drv: cuda._Driver, rt: Any) -> dict[str, str]:
    """Call every driver method once, in the order the backend does; ``{method: outcome}``."""
    stream = _or_null(drv.stream_create, rt.cudaStream_t if rt is not None else None)
    start = _or_null(lambda: drv.event_create(True), rt.cudaEvent_t if rt is not None else None)
    end = _or_null(lambda: drv.event_create(False), rt.cudaEvent_t if rt is not None else None)
    host, host_handle = _or_null(lambda: drv.host_alloc(64), lambda: (np.zeros(64, np.uint8), 0))
    dev, dev_handle = _or_null(lambda: drv.device_alloc(64), lambda: (0, 0))
    dev2, dev2_handle = _or_null(lambda: drv.device_alloc(64), lambda: (0, 0))
    calls: list[tuple[str, tuple[Any, ...]]] = [
        ("device_count", ()), ("device_info", (0,)), ("push", (0,)),
        ("stream_create", ()), ("stream_handle", (stream,)), ("event_create", (True,)),
        ("event_record", (start, stream)), ("htod_async", (dev, host, stream)),
        ("dtod_async", (dev2, dev, 64, stream)), ("dtoh_async", (host, dev2, stream)),
        ("stream_wait_event", (stream, start)), ("event_record", (end, stream)),
        ("event_query", (end,)), ("event_synchronize", (end,)), ("stream_synchronize", (stream,)),
        ("event_elapsed_ms", (start, end)), ("host_alloc", (64,)), ("device_alloc", (64,)),
        ("device_free", (dev_handle,)), ("device_free", (dev2_handle,)), ("host_free", (host_handle,)),
        ("event_destroy", (start,)), ("event_destroy", (end,)), ("stream_destroy", (stream,)), ("pop", ()),
    ]  # fmt: skip
    outcomes: dict[str, str] = {}
    for name, args in calls:
        if rt is None and any(a is None for a in args):
            outcomes.setdefault(name, "skipped: the driver could not create the object it takes")
            continue
        try:
            result = getattr(drv, name)(*args)
        except cuda.CudaError as e:
            assert "\n" not in str(e) and str(e).startswith("CUDA call "), str(e)
            outcomes[name] = f"CudaError: {e}"
            continue
        if name in RETURNS:
            assert isinstance(result, RETURNS[name]), (name, result)
        outcomes[name] = "returned"
    return outcomes


@pytest.mark.parametrize("load", [_cuda_python, _pycuda], ids=["cuda-python", "pycuda"])
def test_every_driver_method_returns_or_raises_cuda_error(load: Callable[[], tuple[cuda._Driver, Any]]) -> None:
    drv, rt = load()
    outcomes = exercise(drv, rt)
    assert sorted(outcomes) == DRIVER_METHODS, "a driver method is not exercised here"
    for name in DRIVER_METHODS:  # the driver implements every operation with the base class's signature
        assert inspect.signature(getattr(type(drv), name)) == inspect.signature(getattr(cuda._Driver, name)), name
    if drv.device_count() == 0:
        assert outcomes["device_info"].startswith("CudaError")
        assert outcomes["pop"] == "returned"


def test_without_a_driver_cuda_python_says_so() -> None:
    """On a machine without the NVIDIA driver cuda-bindings >= 12.8 answers
    cudaErrorInsufficientDriver and older cuda-python raises RuntimeError ("Failed to dlopen
    libcuda.so.1"): both are "no GPU" (0 devices), and the calls that need one say what to install."""
    drv, rt = _cuda_python()
    assert isinstance(drv, cuda._CudaPythonDriver)
    if drv._versions()[0] != 0:
        pytest.skip(f"an NVIDIA driver is loaded here ({_bindings_version()})")
    assert drv.device_count() == 0
    for call in (lambda: drv.push(0), drv.stream_create, lambda: drv.device_alloc(16)):
        with pytest.raises(cuda.CudaError,
                           match=r"(no NVIDIA driver is loaded|libcuda|cuInit).*"
                                 r"install the NVIDIA driver, or use --backend onnxruntime"):
            call()


def test_the_stream_handle_is_read_without_int_where_the_helper_exists() -> None:
    drv, rt = _cuda_python()
    assert isinstance(drv, cuda._CudaPythonDriver)
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        assert drv._native is int
        return
    assert drv._native is get_cuda_native_handle
    assert drv.stream_handle(rt.cudaStream_t(0x1234)) == 0x1234
