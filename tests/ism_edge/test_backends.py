"""Backend selection, the ONNX Runtime backend's contract, and the TensorRT/CUDA code on CPU.

TensorRT and CUDA cannot run here: their tests that need a GPU are marked ``gpu``/``tensorrt``
and skip cleanly; what runs on CPU is the selection logic, the clear errors when they are
unavailable, the helpers, and mypy against the (repaired) tensorrt-stubs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from ism_edge import cuda
from ism_edge.backends import Backend, ChainOutput, backend_class, load_backend, select_backend
from ism_edge.backends.onnxruntime import OnnxRuntimeBackend
from ism_edge.backends.tensorrt import TensorRTBackend, tensorrt_module
from ism_edge.backends.tensorrt.runner import _runs
from ism_edge.errors import EngineError, MissingDependencyError
from ism_edge.manifest import EngineManifest, load_manifest
from tests.conftest import ROOT

TRT_USABLE = TensorRTBackend.available()


@pytest.fixture(scope="module")
def manifest(engine_dir: Path) -> EngineManifest:
    return load_manifest(engine_dir)


def as_tensorrt(manifest: EngineManifest) -> EngineManifest:
    return dataclasses.replace(manifest, backend="tensorrt")


def test_auto_selection(manifest: EngineManifest) -> None:
    assert select_backend(None, manifest) is OnnxRuntimeBackend
    assert select_backend("auto", manifest) is OnnxRuntimeBackend
    expected = TensorRTBackend if TRT_USABLE else OnnxRuntimeBackend
    assert select_backend(None, as_tensorrt(manifest)) is expected


def test_explicit_tensorrt_on_an_onnxruntime_directory_is_refused(manifest: EngineManifest) -> None:
    with pytest.raises(EngineError, match="not TensorRT engines.*--backend tensorrt"):
        select_backend("tensorrt", manifest, "engines/x")


@pytest.mark.skipif(TRT_USABLE, reason="TensorRT is usable here")
def test_tensorrt_unavailable_names_what_to_install(manifest: EngineManifest) -> None:
    with pytest.raises(MissingDependencyError, match=r"pip install 'ism-edge\[tensorrt\]'") as err:
        select_backend("tensorrt", as_tensorrt(manifest))
    assert "\n" not in str(err.value)
    assert not TensorRTBackend.available()


def test_tensorrt_stubs_do_not_count_as_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # what tensorrt-stubs gives
    with pytest.raises(MissingDependencyError, match="tensorrt"):
        tensorrt_module()


def test_unknown_backend_name() -> None:
    with pytest.raises(EngineError, match="unknown backend"):
        backend_class("openvino")


def test_onnxruntime_cuda_device_without_the_provider(engine_dir: Path, manifest: EngineManifest) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    with pytest.raises(MissingDependencyError, match="onnxruntime-gpu"):
        load_backend(engine_dir, manifest, backend="onnxruntime", device="cuda")


def test_onnxruntime_backend_contract(engine_dir: Path, manifest: EngineManifest,
                                      cifar_test: tuple[np.ndarray, np.ndarray]) -> None:
    x = np.ascontiguousarray(cifar_test[0][:6].transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
    with OnnxRuntimeBackend(engine_dir, manifest) as backend:
        assert isinstance(backend, Backend) and backend.providers == ["CPUExecutionProvider"]
        out = backend.infer(x, x_hat=True)
        assert isinstance(out, ChainOutput) and len(out) == 6
        assert out.logits_raw.shape == out.logits_reformed.shape == (6, manifest.num_classes)
        assert out.x_hat is not None and out.x_hat.shape == x.shape
        assert ((out.p_score >= 0) & (out.p_score <= 1)).all()
        np.testing.assert_allclose(out.recon_error, np.abs(x - out.x_hat).mean(axis=(1, 2, 3)), rtol=1e-5, atol=1e-6)
        assert set(out.timings_ms) == {"upload", "mapping", "classifier", "detectors", "download"}
        assert backend.infer(x).x_hat is None
        for bad in (x.astype(np.float64), x[:, :1], np.zeros((65, 3, 32, 32), np.float32),
                    np.zeros((0, 3, 32, 32), np.float32)):
            with pytest.raises(ValueError):
                backend.enqueue(bad)
        jobs = [backend.enqueue(x[:2]), backend.enqueue(x[2:4])]
        with pytest.raises(RuntimeError, match="in flight"):
            backend.enqueue(x[4:])
        assert [len(backend.wait(j)) for j in jobs] == [2, 2]
        with pytest.raises(RuntimeError, match="already waited"):
            backend.wait(jobs[0])
    with pytest.raises(RuntimeError, match="not active"):
        backend.enqueue(x)


def test_onnxruntime_feedback_on_the_still_samples_equals_the_whole_batch_rule(
    engine_dir: Path, manifest: EngineManifest, cifar_test: tuple[np.ndarray, np.ndarray]
) -> None:
    """Re-mapping only the samples still above threshold = ism_edge_training.defense's where() over the batch."""
    x = np.ascontiguousarray(cifar_test[0][:32].transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
    with OnnxRuntimeBackend(engine_dir, manifest, feedback_rounds=0) as plain:
        x_hat, _ = plain._map(x)
        residual = plain._map(x_hat)[1]
    threshold = float(np.quantile(residual, 0.4))
    tuned = dataclasses.replace(manifest, thresholds={**manifest.thresholds, "recon_error": threshold})
    with OnnxRuntimeBackend(engine_dir, tuned, feedback_rounds=3) as backend:
        out = backend.infer(x, x_hat=True)
        reference = x_hat.copy()
        for _ in range(3):
            again, res = backend._map(reference)
            still = res > threshold
            if not still.any():
                break
            reference = np.where(still[:, None, None, None], again, reference)
    assert out.x_hat is not None
    np.testing.assert_allclose(out.x_hat, reference, atol=1e-6)
    assert 0 < (out.rounds > 0).sum() < 32


def test_device_runs_helper() -> None:
    assert _runs(np.array([True, True, False, True, False, False, True])) == [(0, 2), (3, 4), (6, 7)]
    assert _runs(np.zeros(4, bool)) == [] and _runs(np.ones(3, bool)) == [(0, 3)]


def test_tensorrt_backend_refuses_a_cpu_device(manifest: EngineManifest, engine_dir: Path) -> None:
    with pytest.raises(ValueError, match="GPU"):
        TensorRTBackend(engine_dir, as_tensorrt(manifest), device="cpu")


def test_cuda_module_without_a_gpu() -> None:
    if cuda.available():
        pytest.skip("a GPU is visible")
    try:
        drv = cuda.driver()
    except MissingDependencyError:
        return  # neither cuda-python nor pycuda: a clear error is all there is to check
    assert drv.name in cuda.BINDINGS and drv.device_count() == 0
    with pytest.raises(cuda.CudaError, match="not available.*--backend onnxruntime"):
        with cuda.device_context(0):
            pass


def test_cuda_bindings_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "_driver", None)
    monkeypatch.setenv("ISM_EDGE_CUDA", "opencl")
    with pytest.raises(cuda.CudaError, match="ISM_EDGE_CUDA"):
        cuda.driver()
    monkeypatch.setenv("ISM_EDGE_CUDA", "pycuda")
    try:
        import pycuda.driver  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="pycuda"):
            cuda.driver()


def test_tensorrt_backend_and_cuda_module_pass_mypy_against_tensorrt_stubs(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mypy")
    pytest.importorskip("tensorrt_stubs")
    typecheck = pytest.importorskip("ism_edge_engines.typecheck")
    monkeypatch.chdir(ROOT)
    report, status = typecheck.run_mypy(["ism_edge/backends/tensorrt", "ism_edge/cuda.py"])
    assert status == 0, report


# -- real hardware --------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not cuda.available(), reason="needs an NVIDIA GPU")
needs_trt = pytest.mark.skipif(not TRT_USABLE, reason="needs TensorRT and a GPU")


@pytest.mark.gpu
@gpu
def test_cuda_buffers_round_trip_and_events_time() -> None:
    with cuda.device_context(0):
        stream = cuda.Stream()
        host = cuda.HostBuffer((4, 3))
        back = cuda.HostBuffer((4, 3))
        dev, dev2 = cuda.DeviceBuffer((4, 3)), cuda.DeviceBuffer((4, 3))
        host.array[:] = np.arange(12, dtype=np.float32).reshape(4, 3)
        start, end = cuda.Event(), cuda.Event()
        start.record(stream)
        dev.copy_from(host, stream)
        dev2.copy_rows_from(dev, 1, 3, stream)
        dev2.copy_to(back, stream, rows=4)
        end.record(stream)
        end.synchronize()
        assert end.done() and end.elapsed_ms(start) >= 0.0
        np.testing.assert_array_equal(back.array[1:3], host.array[1:3])
        for obj in (host, back, dev, dev2, start, end, stream):
            obj.close()


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
def test_tensorrt_verdicts_match_onnxruntime(untrained_bundle_dir: Path, tmp_path: Path,
                                             cifar_test: tuple[np.ndarray, np.ndarray]) -> None:
    """FP32 TensorRT engines give the ONNX Runtime verdicts; the pipelined schedule changes nothing."""
    from ism_edge import DefenseRuntime
    from ism_edge_engines.build import build_engines

    out = build_engines(untrained_bundle_dir, tmp_path / "trt", backend="tensorrt", precision="fp32", parity_samples=16)
    images = list(cifar_test[0][:80])
    with DefenseRuntime(out, backend="tensorrt", color_order="RGB", feedback_rounds=2, purified=True) as trt_rt:
        got = trt_rt.process_batch(images)
        pending = [trt_rt.submit(images[0]), trt_rt.submit(images[1])]
        pipelined = [trt_rt.collect(p)[0] for p in pending]
    with DefenseRuntime(out, backend="onnxruntime", color_order="RGB", feedback_rounds=2, purified=True) as ort_rt:
        want = ort_rt.process_batch(images)
    for a, b in zip(got, want, strict=True):
        assert a.label == b.label and a.feedback_rounds == b.feedback_rounds
        for k in a.scores:
            assert a.scores[k] == pytest.approx(b.scores[k], rel=1e-3, abs=1e-4)
        assert a.purified is not None and b.purified is not None
        assert np.abs(a.purified.astype(int) - b.purified.astype(int)).max() <= 1
    for p, g in zip(pipelined, got[:2], strict=True):
        assert p.scores == pytest.approx(g.scores)
    assert all(v.timings_ms["mapping"] > 0 and v.timings_ms["upload"] > 0 for v in got)


@pytest.mark.skipif(TRT_USABLE, reason="TensorRT is usable here")
def test_a_tensorrt_directory_runs_on_onnxruntime_through_its_onnx_sources(
    engine_dir: Path, engine_copy: Path, photos: list[np.ndarray]
) -> None:
    from ism_edge import DefenseRuntime
    from tests.ism_edge.conftest import edit_manifest

    edit_manifest(engine_copy, backend="tensorrt", gpu={"name": "NVIDIA Orin", "compute_capability": "8.7"})
    with DefenseRuntime(engine_copy) as fallback, DefenseRuntime(engine_dir) as native:
        assert fallback.backend_name == "onnxruntime" and "ONNX sources" in fallback.describe()
        assert fallback.process(photos[0]).scores == pytest.approx(native.process(photos[0]).scores, rel=1e-4, abs=1e-6)
    with pytest.raises(MissingDependencyError):
        DefenseRuntime(engine_copy, backend="tensorrt")
    source = engine_copy / load_manifest(engine_copy).engines["mapper"].onnx
    source.write_bytes(source.read_bytes() + b"\0")
    with pytest.raises(EngineError, match="ONNX source"):
        DefenseRuntime(engine_copy)


def test_on_the_cuda_provider_an_onnxruntime_directory_loads_its_onnx_sources(
    engine_dir: Path, engine_copy: Path, photos: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saved models are optimized for the CPU provider (com.microsoft fused ops); on CUDA the
    stored, hash-checked sources are loaded instead. Simulated: this onnxruntime has no CUDA
    provider, so it is made to report one and runs the sessions on the CPU."""
    import onnxruntime

    from ism_edge import DefenseRuntime

    manifest = load_manifest(engine_copy)
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with DefenseRuntime(engine_copy, device="cuda") as on_cuda:
        files = on_cuda.backend.model_files  # type: ignore[attr-defined]
        assert files == {r: engine_copy / ef.onnx for r, ef in manifest.engines.items()}
        assert files["mapper"].name == "mapper.subpixel.onnx"
        got = on_cuda.process(photos[0]).scores
    monkeypatch.undo()
    with DefenseRuntime(engine_dir, device="cpu") as on_cpu:
        assert on_cpu.backend.model_files["mapper"] == engine_dir / "mapper.onnx"  # type: ignore[attr-defined]
        assert got == pytest.approx(on_cpu.process(photos[0]).scores, rel=1e-4, abs=1e-6)
    source = engine_copy / manifest.engines["classifier"].onnx  # a source whose name is the engine's
    source.write_bytes(source.read_bytes() + b"\0")
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(EngineError, match=r"classifier ONNX source\) does not match"):
        DefenseRuntime(engine_copy, device="cuda")
