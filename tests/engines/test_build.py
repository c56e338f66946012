"""`ism-edge build` with ONNX Runtime: manifest, parity, INT8, atomicity, rebuilds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ism_edge._io import sha256_file
from ism_edge.errors import BundleError, EngineError, ExitCode, MissingDependencyError
from ism_edge.manifest import ROLES, load_manifest
from tests.engines._cli import CliRun, invoke

pytest.importorskip("onnx")
ROOT = Path(__file__).resolve().parents[2]


def test_cli_build_writes_a_checked_engine_directory(built: CliRun, untrained_bundle_dir: Path) -> None:
    from ism_edge.compat import check_compatible
    from ism_edge_training.bundle import bundle_hash

    assert built.exit_code == 0, built.output
    for step in ("export mapper to ONNX", "convert classifier to FP16", "parity of the FP16 graphs",
                 "optimize perturbation for ONNX Runtime", "parity of the built FP32 engines", "write manifest"):
        assert f"✓ {step}" in built.output
    m = load_manifest(built.out)  # verifies every engine's SHA-256
    check_compatible(m, built.out, bundle=untrained_bundle_dir)
    raw = json.loads((untrained_bundle_dir / "manifest.json").read_text())
    assert (m.backend, m.precision, m.input_shape) == ("onnxruntime", "fp32", (3, 32, 32))
    assert m.bundle_sha256 == bundle_hash(untrained_bundle_dir)
    assert m.thresholds == raw["thresholds"] and list(m.class_names) == raw["class_names"]
    assert m.temperatures["detector"] == raw["temperatures"]["detector"] and m.target_fpr == raw["target_fpr"]
    assert m.batch == {"min": 1, "opt": 8, "max": 64}
    assert {"onnx", "onnxruntime", "torch", "ism_edge", "opset"} <= set(m.versions) and m.gpu is None
    assert m.parity["ok"] and m.parity["gated"] == ["fp32", "engine"]
    for role in ROLES:
        ef = m.engines[role]
        # the mapper's transposed convolutions run as sub-pixel convolutions (ism_edge_engines.subpixel)
        source = "onnx/mapper.subpixel.onnx" if role == "mapper" else f"onnx/{role}.onnx"
        assert (ef.file, ef.onnx) == (f"{role}.onnx", source)
        assert (built.out / "onnx" / f"{role}.fp16.onnx").is_file() and (built.out / "onnx" / f"{role}.onnx").is_file()
    ops = {n.op_type for n in __import__("onnx").load(str(built.out / m.engines["mapper"].onnx)).graph.node}
    assert "ConvTranspose" not in ops and "DepthToSpace" in ops
    assert m.parity["sources"]["onnx/mapper.subpixel.onnx"] == sha256_file(built.out / "onnx" / "mapper.subpixel.onnx")
    assert m.parity["sources"][f"onnx/{ROLES[0]}.onnx"] == sha256_file(built.out / "onnx" / f"{ROLES[0]}.onnx")
    assert not [p for p in built.out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_built_engines_reproduce_the_pytorch_defense(built: CliRun, untrained_bundle_dir: Path) -> None:
    """The runtime (its ONNX Runtime backend and decision code) on the built directory gives PyTorch's labels
    and flags."""
    from ism_edge_engines import parity
    from ism_edge_engines.samples import real_samples
    from ism_edge_training.bundle import DefenseBundle

    m = load_manifest(built.out)
    x, _ = real_samples(m.input_shape, 48, split="train")  # images the build's parity did not use
    ours = parity.runtime_defense_outputs(built.out, m, x)
    ref = parity.torch_defense_outputs(DefenseBundle.load(untrained_bundle_dir), x)
    np.testing.assert_array_equal(ours["label"], ref["label"])
    np.testing.assert_array_equal(ours["flagged"], ref["flagged"])
    np.testing.assert_allclose(ours["p_score"], ref["p_score"], atol=1e-5)


def test_int8_build_is_calibrated_and_parity_gated(untrained_bundle_dir: Path, tmp_path: Path) -> None:
    from ism_edge_engines.build import build_engines

    steps: list[str] = []
    out = build_engines(untrained_bundle_dir, tmp_path / "int8", precision="int8", parity_samples=32,
                        on_step=lambda name, s: steps.append(name) if s is not None else None)
    m = load_manifest(out)
    assert m.precision == "int8" and m.engines["mapper"].file == "mapper.int8.onnx"
    assert m.engines["mapper"].onnx == "onnx/mapper.int8.onnx"
    assert m.parity["engine"]["ok"] and m.parity["engine"]["precision"] == "int8"
    assert "CIFAR-10 train images" in m.parity["calibration"]["source"]
    assert ({r: set(v) for r, v in m.parity["int8_latency_ms"].items() if r in ROLES}
            == {r: {"fp32", "int8"} for r in ROLES})
    ops = {n.op_type for n in __import__("onnx").load(str(out / "onnx" / "classifier.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert "quantize mapper to INT8" in steps and steps[-1] == "total"


def test_interrupted_build_leaves_no_engine_directory(untrained_bundle_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import ism_edge_engines.export
    from ism_edge_engines.build import build_engines

    real = ism_edge_engines.export.onnx_from_module
    calls: list[str] = []

    def export_then_interrupt(*args: object, **kwargs: object) -> Path:
        calls.append(str(args[1]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ism_edge_engines.export, "onnx_from_module", export_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_engines(untrained_bundle_dir, tmp_path / "engines", parity_samples=8)
    assert calls == ["mapper", "classifier"]  # one graph had been written when it stopped
    assert list(tmp_path.iterdir()) == []


def test_interrupted_rebuild_keeps_the_old_directory(engine_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ism_edge_engines.ort_build
    from ism_edge_engines.rebuild import rebuild_from_onnx

    before = {p.relative_to(engine_copy): sha256_file(p) for p in engine_copy.rglob("*") if p.is_file()}

    def interrupted(*args: object, **kwargs: object) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr(ism_edge_engines.ort_build, "optimized_model_from_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rebuild_from_onnx(engine_copy)
    after = {p.relative_to(engine_copy): sha256_file(p) for p in engine_copy.rglob("*") if p.is_file()}
    assert after == before and [p.name for p in engine_copy.parent.iterdir()] == [engine_copy.name]
    load_manifest(engine_copy)


def test_rebuild_from_onnx_needs_neither_torch_nor_onnx(engine_copy: Path) -> None:
    code = (
        "import sys; from ism_edge_engines.rebuild import rebuild_from_onnx\n"
        "from ism_edge.compat import check_compatible\n"
        f"m = rebuild_from_onnx({str(engine_copy)!r}); check_compatible(m, {str(engine_copy)!r})\n"
        "bad = [n for n in ('torch', 'onnx', 'ism_edge_training') if n in sys.modules]\n"
        "assert not bad, bad; print(m.created)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    m = load_manifest(engine_copy)
    assert m.created == proc.stdout.strip() and "rebuilt" in m.parity
    assert m.parity["engine"]["measured"] is False


def test_cli_rebuild_from_an_engine_directory(engine_copy: Path, tmp_path: Path) -> None:
    run = invoke("build", str(engine_copy), "--out", str(tmp_path / "rebuilt"))
    assert run.exit_code == 0, run.output
    assert "✓ verify ONNX sources" in run.output
    m = load_manifest(tmp_path / "rebuilt")
    assert m.bundle_sha256 == load_manifest(engine_copy).bundle_sha256
    run = invoke("build", str(engine_copy), "--out", str(tmp_path / "x"), "--precision", "int8")
    assert run.exit_code != 0 and "holds fp32 graphs" in run.output


def test_out_dir_that_is_not_an_engine_directory_is_refused(untrained_bundle_dir: Path, tmp_path: Path) -> None:
    from ism_edge_engines.build import build_engines

    (tmp_path / "photo.jpg").write_bytes(b"not mine to delete")
    with pytest.raises(EngineError, match="is not an engine directory"):
        build_engines(untrained_bundle_dir, tmp_path)
    assert (tmp_path / "photo.jpg").read_bytes() == b"not mine to delete"


def test_uncalibrated_bundle_is_refused(tmp_path: Path) -> None:
    import torch

    from ism_edge_engines.build import build_engines
    from ism_edge_training.bundle import DefenseBundle
    from ism_edge_training.models import preset

    torch.manual_seed(0)
    DefenseBundle.create(preset("small"), [f"c{i}" for i in range(10)]).save(tmp_path / "b")
    with pytest.raises(BundleError, match="no calibrated threshold for recon_error, jsd, p_score.*calibrate"):
        build_engines(tmp_path / "b", tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_tensorrt_requests_fail_clearly_without_tensorrt(untrained_bundle_dir: Path, tmp_path: Path) -> None:
    from ism_edge_engines.build import build_engines, resolve_backend

    assert resolve_backend("auto") == "onnxruntime"  # tensorrt-stubs alone is not TensorRT
    with pytest.raises(EngineError, match="INT8 TensorRT engines are not supported"):
        build_engines(untrained_bundle_dir, tmp_path / "e", backend="tensorrt", precision="int8")
    with pytest.raises(MissingDependencyError, match=r"'tensorrt'.*ism-edge\[tensorrt\]"):
        build_engines(untrained_bundle_dir, tmp_path / "e", backend="tensorrt", precision="fp16")
    run = invoke("build", str(untrained_bundle_dir), "--out", str(tmp_path / "e"), "--backend", "tensorrt")
    assert run.exit_code != 0 and "error:" in run.output and "Traceback" not in run.output
    run = invoke("build", str(untrained_bundle_dir), "--out", str(tmp_path / "e"), "--batch", "8,4,64")
    assert run.exit_code != 0 and "MIN,OPT,MAX" in run.output
    assert not (tmp_path / "e").exists()


def test_cli_build_fails_on_a_graph_outside_tolerance(untrained_bundle_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from ism_edge_engines import parity

    monkeypatch.setitem(parity.TOLERANCES, "fp16", parity.Tolerance(max_abs=1e-9, mean_abs=1e-10, agreement=0.99))
    run = invoke("build", str(untrained_bundle_dir), "--out", str(tmp_path / "e"), "--backend", "onnxruntime",
                 "--precision", "fp16", "--parity-samples", "16")
    assert run.exit_code == ExitCode.BAD_INPUT
    line = [x for x in run.output.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "the FP16 mapper graph onnx/mapper.fp16.onnx differs from PyTorch on 'x_hat'" in line[0]
    assert "--precision fp32" in line[0] and list(tmp_path.iterdir()) == []


def test_fp16_onnxruntime_build_runs_the_sub_pixel_fp16_mapper(untrained_bundle_dir: Path, tmp_path: Path) -> None:
    import onnx

    from ism_edge_engines.build import build_engines

    out = build_engines(untrained_bundle_dir, tmp_path / "fp16", precision="fp16", parity_samples=32)
    m = load_manifest(out)
    assert m.engines["mapper"].onnx == "onnx/mapper.fp16.subpixel.onnx"
    assert m.engines["classifier"].onnx == "onnx/classifier.fp16.onnx"
    mapper = onnx.load(str(out / m.engines["mapper"].onnx))
    weights = {t.name: t.data_type for t in mapper.graph.initializer}
    subpixel = [n for n in mapper.graph.node if n.name.endswith("__subpixel_conv")]
    assert len(subpixel) == 4 and all(weights[n.input[1]] == onnx.TensorProto.FLOAT16 for n in subpixel)
    assert m.parity["engine"]["ok"] and m.parity["gated"] == ["fp16", "engine"]


def _exporter_breaks_on_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.onnx.export as it behaves when Ctrl-C hits it mid-step: the interrupt breaks a capture
    strategy, whose error the exporter wraps in 'Failed to export the model' (the second graph)."""
    import torch

    real = torch.onnx.export
    calls: list[int] = []

    def export(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) < 2:
            return real(*args, **kwargs)  # type: ignore[arg-type]
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise AttributeError("'NoneType' object has no attribute 'graph_module'") from None
        except AttributeError as e:
            raise RuntimeError("Failed to export the model with torch.export. This is step 1/3 of exporting") from e

    monkeypatch.setattr(torch.onnx, "export", export)


def test_ctrl_c_inside_the_onnx_exporter_is_an_interrupt(untrained_bundle_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from ism_edge_engines.export import graph_modules, onnx_from_module
    from ism_edge_training.bundle import DefenseBundle

    _exporter_breaks_on_ctrl_c(monkeypatch)
    modules = graph_modules(DefenseBundle.load(untrained_bundle_dir))
    onnx_from_module(modules["classifier"], "classifier", tmp_path / "a.onnx", (3, 32, 32))
    with pytest.raises(KeyboardInterrupt):
        onnx_from_module(modules["classifier"], "classifier", tmp_path / "b.onnx", (3, 32, 32))


def test_cli_build_interrupted_inside_the_exporter_says_interrupted(untrained_bundle_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _exporter_breaks_on_ctrl_c(monkeypatch)
    run = invoke("build", str(untrained_bundle_dir), "--out", str(tmp_path / "e"), "--backend", "onnxruntime",
                 "--parity-samples", "8")
    assert run.exit_code == ExitCode.INTERRUPTED, run.output
    assert run.output.strip().splitlines()[-1] == "interrupted"
    assert "Failed to export" not in run.output and "Traceback" not in run.output and "error:" not in run.output
    assert list(tmp_path.iterdir()) == []


def _build_until_partial(bundle: Path, out: Path) -> tuple[subprocess.Popen[str], Path]:
    """Start `ism-edge build` in a child process; return it once its temporary directory exists."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ism_edge_cli.main", "build", str(bundle), "--out", str(out),
                             "--backend", "onnxruntime", "--parity-samples", "8"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import time

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        partials = list(out.parent.glob(f".{out.name}.*.partial"))
        if partials:
            return proc, partials[0]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the build made no temporary directory: {proc.communicate()}")


def test_sigterm_during_a_build_is_interrupted_and_leaves_nothing(untrained_bundle_dir: Path, tmp_path: Path) -> None:
    import signal

    proc, _partial = _build_until_partial(untrained_bundle_dir, tmp_path / "engines")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    # 143, or -SIGINT when the interrupt reached the interpreter's top after the cleanup (Python then
    # ends itself with SIGINT, which a shell reports as 130); seen once in ~10 runs.
    assert proc.returncode in (ExitCode.TERMINATED, -signal.SIGINT), stderr
    assert stderr.strip().splitlines()[-1] == "stopped by SIGTERM" and "Traceback" not in stderr, stderr
    assert list(tmp_path.iterdir()) == []


def test_the_next_build_removes_what_a_killed_build_left(untrained_bundle_dir: Path, tmp_path: Path) -> None:
    import signal

    from ism_edge._io import atomic_directory

    proc, partial = _build_until_partial(untrained_bundle_dir, tmp_path / "engines")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert partial.is_dir()  # nothing can clean up after SIGKILL ...
    with atomic_directory(tmp_path / "engines") as tmp:  # ... but the next build of the target does
        (tmp / "manifest.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]
