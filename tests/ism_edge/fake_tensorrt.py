"""A CPU stand-in for a GPU and for TensorRT, to run the TensorRT backend's code on this machine.

:class:`FakeCudaDriver` implements :class:`ism_edge.cuda._Driver` with host memory: every
"device" buffer is a numpy array, copies are ``memmove`` at the moment they are queued, and
every access is checked against the allocations (a write past a buffer fails the test). The
fake ``tensorrt`` module deserializes "plans" that are JSON descriptions of small numpy
networks with the graph I/O of each role, and its execution contexts compute them on the bound
addresses. Everything that happens is appended to one ``log``, in order, so a test can check
what was queued and when the host waited.
"""

from __future__ import annotations

import ctypes
import enum
import json
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ism_edge.backends import GRAPH_IO
from ism_edge.cuda import DeviceInfo, _Driver
from ism_edge.manifest import ROLES, EngineFile, EngineManifest, TensorSpec

CHW = (3, 4, 4)
CLASSES = 10


# -- the networks ---------------------------------------------------------------------------------


def mapper(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """M(x) = (x + 0.5) / 2 (a contraction towards 0.5: every feedback round halves the residual)."""
    x_hat = (x + 0.5) / 2
    return x_hat, np.abs(x - x_hat).mean(axis=(1, 2, 3))


def classifier(x: np.ndarray, classes: int = CLASSES) -> np.ndarray:
    return x.mean(axis=(1, 2, 3))[:, None] * np.arange(1, classes + 1, dtype=np.float32)


def perturbation(x: np.ndarray, x_hat: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-(x - x_hat).mean(axis=(1, 2, 3)) * 10))


def reference(x: np.ndarray, threshold: float, rounds: int) -> dict[str, np.ndarray]:
    """The chain as ``ism_edge_training.defense`` defines it, on the numpy networks above."""
    x_hat, recon = mapper(x)
    done = np.zeros(len(x), dtype=np.int32)
    for _ in range(rounds):
        again, residual = mapper(x_hat)
        still = residual > threshold
        if not still.any():
            break
        x_hat = np.where(still[:, None, None, None], again, x_hat)
        done[still] += 1
    return {
        "recon_error": recon, "logits_raw": classifier(x), "logits_reformed": classifier(x_hat),
        "p_score": perturbation(x, x_hat), "x_hat": x_hat, "rounds": done,
    }  # fmt: skip


# -- the GPU --------------------------------------------------------------------------------------


@dataclass
class FakeEvent:
    timing: bool
    t: float = 0.0


class FakeCudaDriver(_Driver):
    """A GPU made of host memory; see the module docstring."""

    name = "fake"

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.memory: dict[int, np.ndarray] = {}
        self._streams = 0

    def span(self, address: int, nbytes: int) -> None:
        """Fail unless ``[address, address + nbytes)`` lies inside one device allocation."""
        for start, buf in self.memory.items():
            if start <= address and address + nbytes <= start + buf.nbytes:
                return
        raise AssertionError(f"device access of {nbytes} bytes at {address:#x} is outside every allocation")

    def view(self, address: int, shape: tuple[int, ...]) -> np.ndarray:
        """The float32 array of ``shape`` at device ``address`` (checked)."""
        count = int(np.prod(shape))
        self.span(address, count * 4)
        return np.ctypeslib.as_array((ctypes.c_float * count).from_address(address)).reshape(shape)

    def device_count(self) -> int:
        return 1

    def device_info(self, device: int) -> DeviceInfo:
        return DeviceInfo(device, "Fake GPU", "8.7")

    def push(self, device: int) -> None:
        return None

    def pop(self) -> None:
        return None

    def stream_create(self) -> Any:
        self._streams += 1
        return self._streams

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def stream_synchronize(self, stream: Any) -> None:
        self.log.append(("sync", stream))

    def stream_wait_event(self, stream: Any, event: Any) -> None:
        self.log.append(("wait", stream))

    def stream_destroy(self, stream: Any) -> None:
        return None

    def event_create(self, timing: bool) -> Any:
        return FakeEvent(timing)

    def event_record(self, event: Any, stream: Any) -> None:
        event.t = time.perf_counter()

    def event_synchronize(self, event: Any) -> None:
        return None

    def event_query(self, event: Any) -> bool:
        return True

    def event_elapsed_ms(self, start: Any, end: Any) -> float:
        return (end.t - start.t) * 1e3

    def event_destroy(self, event: Any) -> None:
        return None

    def host_alloc(self, nbytes: int) -> tuple[np.ndarray, Any]:
        array = np.zeros(nbytes, np.uint8)
        return array, array

    def host_free(self, handle: Any) -> None:
        return None

    def device_alloc(self, nbytes: int) -> tuple[int, Any]:
        buf = np.full(nbytes, 0xFF, np.uint8)  # NaN-filled floats: reading unwritten memory shows
        address = int(buf.ctypes.data)
        self.memory[address] = buf
        return address, address

    def device_free(self, handle: Any) -> None:
        del self.memory[handle]

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self.span(dst, src.nbytes)
        self.log.append(("htod", stream, src.nbytes))
        ctypes.memmove(dst, src.ctypes.data, src.nbytes)

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self.span(src, dst.nbytes)
        self.log.append(("dtoh", stream, dst.nbytes))
        ctypes.memmove(dst.ctypes.data, src, dst.nbytes)

    def dtod_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        self.span(dst, nbytes)
        self.span(src, nbytes)
        self.log.append(("dtod", stream, nbytes))
        ctypes.memmove(dst, src, nbytes)


# -- TensorRT -------------------------------------------------------------------------------------


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1


@dataclass
class PlanSpec:
    """What a fake plan file holds. ``classes``/``score_shape`` let a test build a wrong engine;
    ``refuse``: batch sizes ``set_input_shape`` refuses although they are in the profile."""

    role: str
    min: int = 1
    opt: int = 4
    max: int = 8
    classes: int = CLASSES
    score_shape: tuple[int, ...] = ()
    refuse: tuple[int, ...] = ()

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(self.__dict__))
        return path


def _out_rows(spec: PlanSpec) -> dict[str, tuple[int, ...]]:
    return {"x_hat": CHW, "recon_error": spec.score_shape, "logits": (spec.classes,), "p_score": spec.score_shape}


@dataclass
class FakeContext:
    spec: PlanSpec
    gpu: FakeCudaDriver
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    addresses: dict[str, int] = field(default_factory=dict)

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        batch = shape[0]
        if not self.spec.min <= batch <= self.spec.max or batch in self.spec.refuse:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        batch = next(iter(self.shapes.values()))[0] if self.shapes else -1
        return (batch, *_out_rows(self.spec)[name])

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream: int) -> bool:
        ins, outs = GRAPH_IO[self.spec.role]
        batch = self.shapes[ins[0]][0]
        self.gpu.log.append(("execute", stream, self.spec.role, batch, dict(self.addresses)))
        x = [self.gpu.view(self.addresses[n], (batch, *CHW)).copy() for n in ins]
        if self.spec.role == "mapper":
            results: tuple[np.ndarray, ...] = mapper(x[0])
        elif self.spec.role == "classifier":
            results = (classifier(x[0], self.spec.classes),)
        else:
            results = (perturbation(x[0], x[1]),)
        for name, value in zip(outs, results, strict=True):
            shape = (batch, *_out_rows(self.spec)[name])
            self.gpu.view(self.addresses[name], shape)[...] = value.reshape(shape)
        return True


class FakeEngine:
    def __init__(self, spec: PlanSpec, gpu: FakeCudaDriver) -> None:
        self.spec, self.gpu = spec, gpu
        ins, outs = GRAPH_IO[spec.role]
        self.names = [*ins, *outs]
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name in GRAPH_IO[self.spec.role][0] else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType.FLOAT

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.get_tensor_mode(name) is TensorIOMode.INPUT:
            return (-1, *CHW)
        return (-1, *_out_rows(self.spec)[name])

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        return [(b, *CHW) for b in (self.spec.min, self.spec.opt, self.spec.max)]

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self.spec, self.gpu)


def tensorrt_module(gpu: FakeCudaDriver, version: str = "10.3.0.30") -> types.ModuleType:
    """A ``tensorrt`` module whose runtime deserializes :class:`PlanSpec` files onto ``gpu``."""
    trt = types.ModuleType("tensorrt")

    class Logger:
        WARNING = 2
        INFO = 3

        def __init__(self, level: int = 2) -> None:
            self.level = level

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
            try:
                raw = json.loads(data)
            except ValueError:
                return None
            raw["score_shape"], raw["refuse"] = tuple(raw["score_shape"]), tuple(raw["refuse"])
            return FakeEngine(PlanSpec(**raw), gpu)

    trt.__version__ = version  # type: ignore[attr-defined]
    trt.Builder = object  # type: ignore[attr-defined]  # what tells the real TensorRT from tensorrt-stubs
    trt.Logger = Logger  # type: ignore[attr-defined]
    trt.Runtime = Runtime  # type: ignore[attr-defined]
    trt.TensorIOMode = TensorIOMode  # type: ignore[attr-defined]
    trt.DataType = DataType  # type: ignore[attr-defined]
    return trt


def engine_directory(directory: Path, threshold: float = 0.05, **specs: PlanSpec) -> EngineManifest:
    """Write one plan per role (``specs`` overrides a role's) and return a matching manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for role in ROLES:
        spec = specs.get(role, PlanSpec(role))
        spec.write(directory / f"{role}.plan")
        inputs, outputs = (tuple(TensorSpec(n, (-1,)) for n in names) for names in GRAPH_IO[role])
        files[role] = EngineFile(role, f"{role}.plan", f"onnx/{role}.fp16.onnx", "0" * 64, inputs, outputs)
    return EngineManifest(
        backend="tensorrt", precision="fp16", input_shape=CHW, class_names=tuple(f"c{i}" for i in range(CLASSES)),
        thresholds={"recon_error": threshold, "jsd": 1.0, "p_score": 0.5},
        temperatures={"deploy": 1.0, "detector": 1.0},
        target_fpr=0.05, batch={"min": 1, "opt": 4, "max": 8}, engines=files, bundle_sha256="0" * 64,
        gpu={"name": "Fake GPU", "compute_capability": "8.7"},
    )  # fmt: skip
