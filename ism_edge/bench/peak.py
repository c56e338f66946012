"""The machine's measured GEMM peak: float32 matrix products, best of several runs.

Two probes run in the benchmark's own process: ONNX Runtime's ``MatMul`` (MLAS, the GEMM the
chain's convolutions use) in a session with the chain's intra-op thread count, and numpy's
``matmul`` (the BLAS numpy was built with, at its own thread count). The peak is the faster of the
two, so the chain's share of it is not flattered. A product of two n×n matrices counts 2·n³ FLOPs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ism_edge.errors import MissingDependencyError

DEFAULT_SIZE = 1024
DEFAULT_REPEATS = 7


@dataclass(frozen=True)
class PeakProbe:
    """One probe: ``flops_per_s`` is the best of ``repeats`` timed products of n×n float32 matrices."""

    name: str
    size: int
    threads: int | None  # None: the library's own default
    repeats: int
    best_s: float

    @property
    def flops_per_s(self) -> float:
        return 2.0 * self.size**3 / self.best_s

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "threads": self.threads,
            "repeats": self.repeats,
            "best_ms": round(self.best_s * 1e3, 4),
            "gflops": round(self.flops_per_s / 1e9, 2),
        }


def _best(fn: Any, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def numpy_probe(size: int = DEFAULT_SIZE, repeats: int = DEFAULT_REPEATS) -> PeakProbe:
    """numpy float32 ``a @ b`` of n×n matrices (numpy's BLAS, its default thread count)."""
    rng = np.random.default_rng(0)
    a = rng.random((size, size), dtype=np.float32)
    b = rng.random((size, size), dtype=np.float32)
    out = np.empty_like(a)
    return PeakProbe("numpy matmul", size, None, repeats, _best(lambda: np.matmul(a, b, out=out), repeats))


def _matmul_model(size: int) -> bytes:
    from onnx import TensorProto, helper

    shape = [size, size]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm_probe",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, shape),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def onnxruntime_probe(threads: int | None, size: int = DEFAULT_SIZE, repeats: int = DEFAULT_REPEATS) -> PeakProbe:
    """ONNX Runtime ``MatMul`` on the CPU provider with ``threads`` intra-op threads.

    The inputs are fed at run time (not initializers), so nothing is constant-folded. Needs the
    ``onnx`` package to write the one-node graph.
    """
    try:
        model = _matmul_model(size)
    except ImportError:
        raise MissingDependencyError(
            "the ONNX Runtime GEMM probe needs the Python module 'onnx': pip install onnx"
        ) from None
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"a": rng.random((size, size), dtype=np.float32), "b": rng.random((size, size), dtype=np.float32)}
    return PeakProbe("onnxruntime MatMul", size, threads, repeats, _best(lambda: sess.run(None, feed), repeats))


@dataclass(frozen=True)
class Peak:
    """The probes that ran, the ones that could not (with why), and the best rate."""

    probes: tuple[PeakProbe, ...]
    skipped: dict[str, str]

    @property
    def flops_per_s(self) -> float | None:
        return max((p.flops_per_s for p in self.probes), default=None)

    def to_json(self) -> dict[str, Any]:
        best = self.flops_per_s
        return {
            "gflops": None if best is None else round(best / 1e9, 2),
            "probes": [p.to_json() for p in self.probes],
            "skipped": dict(self.skipped),
        }


def gemm_peak(threads: int | None, size: int = DEFAULT_SIZE, repeats: int = DEFAULT_REPEATS) -> Peak:
    """Run both probes; a probe whose library is missing is listed in ``skipped``."""
    probes = [numpy_probe(size, repeats)]
    skipped: dict[str, str] = {}
    try:
        probes.append(onnxruntime_probe(threads, size, repeats))
    except MissingDependencyError as e:
        skipped["onnxruntime MatMul"] = str(e)
    return Peak(tuple(probes), skipped)
