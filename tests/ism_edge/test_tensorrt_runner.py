"""The TensorRT backend's own code on CPU: its schedule, buffers and checks on a fake GPU and a
fake TensorRT (tests/ism_edge/fake_tensorrt.py). What it cannot show — that real TensorRT and a
real GPU behave like the fakes — is the job of the ``gpu``/``tensorrt`` tests in test_backends.py.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ism_edge import cuda
from ism_edge.backends.tensorrt import TensorRTBackend
from ism_edge.errors import EngineError, EngineMismatchError
from tests.ism_edge import fake_tensorrt as fake
from tests.ism_edge.fake_tensorrt import CHW, CLASSES, PlanSpec


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[fake.FakeCudaDriver]:
    """A fake GPU as the CUDA driver and a fake TensorRT 10.3 as ``tensorrt``."""
    driver = fake.FakeCudaDriver()
    monkeypatch.setattr(cuda, "_driver", driver)
    monkeypatch.setitem(sys.modules, "tensorrt", fake.tensorrt_module(driver))
    yield driver
    assert not driver.memory, "device buffers were not freed"


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *CHW), dtype=np.float32)


def executions(gpu: fake.FakeCudaDriver, since: int = 0) -> list[tuple[str, int]]:
    return [(e[2], e[3]) for e in gpu.log[since:] if e[0] == "execute"]


@pytest.mark.parametrize("rounds", [0, 2])
def test_the_chain_on_a_fake_gpu_equals_the_reference(gpu: fake.FakeCudaDriver, tmp_path: Path, rounds: int) -> None:
    x = images(5)
    threshold = float(np.quantile(fake.mapper(fake.mapper(x)[0])[1], 0.5))  # about half the samples re-mapped
    manifest = fake.engine_directory(tmp_path, threshold=threshold)
    want, want2 = fake.reference(x, threshold, rounds), fake.reference(x[3:], threshold, rounds)
    with TensorRTBackend(tmp_path, manifest, feedback_rounds=rounds) as backend:
        jobs = [backend.enqueue(x, x_hat=True), backend.enqueue(x[3:])]  # two in flight: both slots
        got, last2 = backend.wait(jobs[0]), backend.wait(jobs[1])
    for name in ("recon_error", "logits_raw", "logits_reformed", "p_score", "x_hat", "rounds"):
        np.testing.assert_allclose(getattr(got, name), want[name], rtol=1e-6, err_msg=name)
        if name != "x_hat":
            np.testing.assert_allclose(getattr(last2, name), want2[name], rtol=1e-6, err_msg=name)
    if rounds:
        assert 0 < (got.rounds > 0).sum() < 5
    assert last2.x_hat is None and set(got.timings_ms) == {"upload", "mapping", "classifier", "detectors", "download"}


def test_done_asks_the_device_without_waiting(gpu: fake.FakeCudaDriver, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = fake.engine_directory(tmp_path, threshold=0.5)
    with TensorRTBackend(tmp_path, manifest) as backend:
        job = backend.enqueue(images(2))
        monkeypatch.setattr(gpu, "event_query", lambda event: False)  # the GPU still at work
        assert not backend.done(job)
        monkeypatch.setattr(gpu, "event_query", lambda event: True)
        assert backend.done(job)
        backend.wait(job)
        with pytest.raises(RuntimeError, match="already waited"):
            backend.done(job)


def test_the_raw_classifier_pass_is_queued_before_feedback_makes_the_host_wait(gpu: fake.FakeCudaDriver,
                                                                               tmp_path: Path) -> None:
    """C(x) overlaps M even with feedback rounds: it is enqueued before the host first waits."""
    manifest = fake.engine_directory(tmp_path, threshold=0.0)  # every sample goes another round
    with TensorRTBackend(tmp_path, manifest, feedback_rounds=2) as backend:
        start = len(gpu.log)
        backend.infer(images(3))
        log = gpu.log[start:]
    first_sync = next(i for i, e in enumerate(log) if e[0] == "sync")
    raw_pass = next(i for i, e in enumerate(log) if e[0] == "execute" and e[2] == "classifier")
    assert raw_pass < first_sync
    assert [role for role, _ in executions(gpu, start)] == ["classifier", "mapper", "mapper", "mapper", "classifier",
                                                            "perturbation"]


@pytest.mark.parametrize(
    ("role", "spec", "shape"),
    [
        ("classifier", PlanSpec("classifier", classes=CLASSES + 2), f"[8, {CLASSES + 2}]"),  # would write past logits_*
        ("perturbation", PlanSpec("perturbation", score_shape=(1,)), "[8, 1]"),
    ],
)
def test_an_output_shape_other_than_its_buffer_is_refused_on_activation(
    gpu: fake.FakeCudaDriver, tmp_path: Path, role: str, spec: PlanSpec, shape: str
) -> None:
    manifest = fake.engine_directory(tmp_path, **{role: spec})
    backend = TensorRTBackend(tmp_path, manifest)
    with pytest.raises(EngineMismatchError,
                       match=rf"\({role}\) output .* has shape {re.escape(shape)}.*rebuild") as err:
        backend.activate()
    assert "\n" not in str(err.value)
    assert not executions(gpu) and not backend.is_active


def test_a_batch_below_the_profile_minimum_runs_padded(gpu: fake.FakeCudaDriver, tmp_path: Path) -> None:
    manifest = fake.engine_directory(tmp_path,
                                     **{r: PlanSpec(r, min=4) for r in ("mapper", "classifier", "perturbation")})
    x = images(2)
    with TensorRTBackend(tmp_path, manifest, feedback_rounds=0) as backend:
        start = len(gpu.log)
        out = backend.infer(x, x_hat=True)
    assert {batch for _, batch in executions(gpu, start)} == {4}
    want = fake.reference(x, 1.0, 0)
    assert len(out) == 2 and out.x_hat is not None
    for name in ("recon_error", "logits_raw", "logits_reformed", "p_score", "x_hat"):
        np.testing.assert_allclose(getattr(out, name), want[name], rtol=1e-6, err_msg=name)


def test_a_refused_batch_queues_nothing_and_leaves_the_backend_usable(gpu: fake.FakeCudaDriver, tmp_path: Path) -> None:
    manifest = fake.engine_directory(tmp_path, perturbation=PlanSpec("perturbation", refuse=(3,)))
    with TensorRTBackend(tmp_path, manifest) as backend:
        start = len(gpu.log)
        with pytest.raises(EngineError, match=r"\(perturbation\): batch 3 is outside"):
            backend.enqueue(images(3))
        assert gpu.log[start:] == []  # no upload, no engine, no event wait was queued
        assert len(backend.infer(images(2))) == 2


def test_profiles_that_leave_no_batch_are_refused(gpu: fake.FakeCudaDriver, tmp_path: Path) -> None:
    manifest = fake.engine_directory(tmp_path, mapper=PlanSpec("mapper", min=4, max=8),
                                     classifier=PlanSpec("classifier", max=2))
    with pytest.raises(EngineMismatchError, match="no batch size"):
        TensorRTBackend(tmp_path, manifest).activate()
