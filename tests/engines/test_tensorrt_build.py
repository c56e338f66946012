"""ism_edge_engines.tensorrt_build on CPU, against a fake TensorRT builder that records what it was asked.

The real TensorRT calls are type-checked against tensorrt-stubs (test_typecheck.py); what these
tests add is the builder's own decisions: TF32 cleared, a bad timing cache replaced by an empty
one with a warning, the profile on the batch axis.
"""

from __future__ import annotations

import enum
import re
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ism_edge_engines.tensorrt_build import BatchProfile, engine_from_onnx

CACHE_MAGIC = b"TRTCACHE"


class BuilderFlag(enum.Enum):
    TF32 = 6
    FP16 = 0


class FakeCache:
    def __init__(self, blob: bytes, foreign: bool = False) -> None:
        self.blob, self.foreign = blob, foreign

    def serialize(self) -> np.ndarray:
        return np.frombuffer(CACHE_MAGIC + b"tactics", np.uint8)


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, lo: tuple[int, ...], opt: tuple[int, ...], hi: tuple[int, ...]) -> None:
        self.shapes[name] = (lo, opt, hi)


class FakeConfig:
    def __init__(self) -> None:
        self.flags = {BuilderFlag.TF32}  # TensorRT enables TF32 by default
        self.profiles: list[FakeProfile] = []
        self.cache: FakeCache | None = None

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.workspace = size

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile)
        return 0

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: BuilderFlag) -> None:
        self.flags.discard(flag)

    def create_timing_cache(self, blob: bytes) -> FakeCache:
        if blob and not blob.startswith(CACHE_MAGIC):
            raise RuntimeError("Timing cache header mismatch\nmore detail")
        return FakeCache(blob, foreign=blob.startswith(CACHE_MAGIC + b"other-gpu"))

    def set_timing_cache(self, cache: FakeCache, ignore_mismatch: bool) -> bool:
        if cache.foreign and not ignore_mismatch:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self) -> FakeCache:
        assert self.cache is not None
        return self.cache


class FakeTensor:
    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name, self.shape = name, shape


class FakeNetwork:
    inputs = [FakeTensor("x", (-1, 3, 4, 4))]
    outputs = [FakeTensor("logits", (-1, 10))]
    num_inputs, num_outputs = 1, 1

    def get_input(self, i: int) -> FakeTensor:
        return self.inputs[i]

    def get_output(self, i: int) -> FakeTensor:
        return self.outputs[i]


def fake_tensorrt(built: list[FakeConfig]) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")

    class Builder:
        def __init__(self, logger: Any) -> None:
            pass

        def create_network(self, flags: int) -> FakeNetwork:
            assert flags == 1 << 0  # STRONGLY_TYPED
            return FakeNetwork()

        def create_builder_config(self) -> FakeConfig:
            built.append(FakeConfig())
            return built[-1]

        def create_optimization_profile(self) -> FakeProfile:
            return FakeProfile()

        def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> np.ndarray:
            return np.frombuffer(b"PLAN", np.uint8)

    class OnnxParser:
        def __init__(self, network: FakeNetwork, logger: Any) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            return True

    class Logger:
        WARNING, INFO = 2, 3

        def __init__(self, level: int) -> None:
            pass

    trt.__version__ = "10.3.0.30"  # type: ignore[attr-defined]
    trt.Builder = Builder  # type: ignore[attr-defined]
    trt.OnnxParser = OnnxParser  # type: ignore[attr-defined]
    trt.Logger = Logger  # type: ignore[attr-defined]
    trt.BuilderFlag = BuilderFlag  # type: ignore[attr-defined]
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)  # type: ignore[attr-defined]
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)  # type: ignore[attr-defined]
    trt.Dims = tuple  # type: ignore[attr-defined]
    return trt


@pytest.fixture
def configs(monkeypatch: pytest.MonkeyPatch) -> list[FakeConfig]:
    """The builder configs of every build, with a fake TensorRT 10.3 as ``tensorrt``."""
    built: list[FakeConfig] = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(built))
    return built


def build(tmp_path: Path, cache: Path | None = None) -> Any:
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"")
    return engine_from_onnx(onnx, tmp_path / "m.plan", batch=BatchProfile(1, 4, 8), timing_cache=cache)


def test_tf32_is_cleared_so_fp32_tensors_compute_in_fp32(configs: list[FakeConfig], tmp_path: Path) -> None:
    built = build(tmp_path)
    assert BuilderFlag.TF32 not in configs[0].flags
    assert configs[0].profiles[0].shapes == {"x": ((1, 3, 4, 4), (4, 3, 4, 4), (8, 3, 4, 4))}
    assert built.inputs == {"x": (-1, 3, 4, 4)} and (tmp_path / "m.plan").read_bytes() == b"PLAN"


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (b"not a timing cache", "corrupt or not a TensorRT timing cache (Timing cache header mismatch)"),
        (CACHE_MAGIC + b"other-gpu", "written by another TensorRT version or for another GPU"),
    ],
)
def test_a_bad_timing_cache_is_replaced_by_an_empty_one_with_a_warning(
    configs: list[FakeConfig], tmp_path: Path, blob: bytes, reason: str
) -> None:
    cache = tmp_path / "trt.timing-cache"
    cache.write_bytes(blob)
    with pytest.warns(UserWarning, match=rf"{cache.name} .*{re.escape(reason)}.*empty timing cache"):
        built = build(tmp_path, cache)
    assert configs[0].cache is not None and configs[0].cache.blob == b""
    assert built.timing_cache_saved and cache.read_bytes() == CACHE_MAGIC + b"tactics"  # written back, now valid


def test_a_good_or_missing_timing_cache_builds_without_a_warning(configs: list[FakeConfig], tmp_path: Path) -> None:
    cache = tmp_path / "trt.timing-cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(tmp_path, cache)  # missing: created
        build(tmp_path, cache)  # present and valid: loaded
    assert configs[1].cache is not None and configs[1].cache.blob == CACHE_MAGIC + b"tactics"


def test_the_tensorrt_build_writes_one_plan_per_role_unmeasured(configs: list[FakeConfig], tmp_path: Path) -> None:
    from ism_edge.manifest import ROLES
    from ism_edge_engines import tensorrt_build
    from ism_edge_engines.progress import Steps

    graphs = {role: tmp_path / "onnx" / f"{role}.fp16.onnx" for role in ROLES}
    for path in graphs.values():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    names: list[str] = []
    steps = Steps(lambda name, s: names.append(name) if s is not None else None)
    built = tensorrt_build.build(graphs, tmp_path, "fp16", steps, batch=BatchProfile(1, 4, 8), workspace_mb=64,
                                 timing_cache=None)
    assert built.engines == {role: tmp_path / f"{role}.plan" for role in ROLES} and built.sources == graphs
    assert all(p.read_bytes() == b"PLAN" for p in built.engines.values()) and len(configs) == len(ROLES)
    assert not built.measured and built.report["engine"] == {"measured": False, "ok": True,
                                                             "reason": built.report["engine"]["reason"]}
    assert names == [f"build TensorRT engine {role}" for role in ROLES]


def test_a_tensorrt_build_without_a_visible_gpu_is_refused(configs: list[FakeConfig],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from ism_edge import compat
    from ism_edge.errors import EngineError
    from ism_edge_engines import tensorrt_build

    monkeypatch.setattr(compat, "current_gpu", lambda device=0: None)
    with pytest.raises(EngineError, match="no CUDA GPU is visible.*--backend onnxruntime"):
        tensorrt_build.gpu_for_build()
    monkeypatch.setattr(compat, "current_gpu", lambda device=0: {"name": "Orin", "compute_capability": "8.7"})
    assert tensorrt_build.gpu_for_build()["name"] == "Orin"
