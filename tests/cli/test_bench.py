"""`ism-edge bench` from the command line: the side-by-side report, the camera-rate run, errors.

Tiny runs only: the structure of what is printed and written is tested, never a speed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ism_edge.errors import ExitCode

pytest.importorskip("torch")  # the engine directory fixture and the PyTorch column
pytest.importorskip("onnx")

from ism_edge_cli.main import app as main_app  # noqa: E402
from tests.cli import one_error_line  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.ism_edge.conftest import shared_engine_dir  # noqa: E402

runner = CliRunner()


APP = main_app


@pytest.fixture(scope="session")
def engine_dir(untrained_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_engine_dir(untrained_bundle_dir, tmp_path_factory)


def test_side_by_side_with_pytorch_eager(engine_dir: Path, untrained_bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = runner.invoke(APP, ["bench", str(engine_dir), "--bundle", str(untrained_bundle_dir), "--batch", "1,4",
                            "--frames", "8", "--threads", "1", "--frame-size", "128x96", "--no-torch-compile",
                            "--json", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    rep = json.loads(out.read_text())
    cols = {c["name"]: c for c in rep["columns"]}
    assert list(cols) == ["pytorch-eager", "pytorch-compile", "onnxruntime-fp32", "onnxruntime-int8", "tensorrt"]
    assert cols["pytorch-compile"]["status"] == "not run" and "--no-torch-compile" in cols["pytorch-compile"]["reason"]
    eager, fp32 = cols["pytorch-eager"], cols["onnxruntime-fp32"]
    assert eager["status"] == fp32["status"] == "ok" and "torch" in eager["describe"]
    assert cols["onnxruntime-int8"]["status"] == "not run" and "--precision int8" in cols["onnxruntime-int8"]["reason"]
    tensorrt = cols["tensorrt"]
    assert tensorrt["status"] == "not run" and tensorrt["reason"]
    for res in eager["results"]:
        assert res["vs_eager"] == 1.0
    for res, base in zip(fp32["results"], eager["results"], strict=True):
        assert res["vs_eager"] == pytest.approx(res["images_per_s"] / base["images_per_s"])
        assert set(res["stages_ms"]) >= {"preprocess", "upload", "mapping", "classifier", "detectors", "download"}
    # the same inputs through PyTorch and the FP32 engines: the same decisions
    assert fp32["agreement"]["against"] == "pytorch-eager"
    assert fp32["agreement"]["labels"] == 1.0 and fp32["agreement"]["flags"] == 1.0
    assert rep["flops"]["per_input"] > 0 and rep["peak"]["gflops"] > 0 and 0 < rep["best_peak_share"]["peak_share"]
    # the table and the lines for what did not run
    assert "PyTorch eager" in r.stdout and "ONNX Runtime FP32" in r.stdout and "% peak" in r.stdout
    assert "ONNX Runtime INT8: no INT8 engine directory given" in r.stdout
    assert "TensorRT FP16:" in r.stdout


def test_the_torch_compile_column_and_the_ratio_to_the_fastest_peer(engine_dir: Path, untrained_bundle_dir: Path,
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                    ) -> None:
    """The column's plumbing: its compile time apart, and every ratio against the faster PyTorch column.
    Inductor itself is left out (it compiles for minutes on 2 cores): torch.compile returns the module."""
    import torch

    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    out = tmp_path / "bench.json"
    r = runner.invoke(APP, ["bench", str(engine_dir), "--bundle", str(untrained_bundle_dir), "--batch", "1,4",
                            "--frames", "8", "--threads", "1", "--frame-size", "128x96", "--json", str(out)])
    assert r.exit_code == 0, r.stderr
    cols = {c["name"]: c for c in json.loads(out.read_text())["columns"]}
    compiled = cols["pytorch-compile"]
    assert compiled["status"] == "ok" and "torch.compile (inductor)" in compiled["describe"]
    assert all(res["compile_s"] > 0 for res in compiled["results"])
    assert all("compile_s" not in res for res in cols["onnxruntime-fp32"]["results"])
    for i, batch in enumerate((1, 4)):
        peers = {n: cols[n]["results"][i]["images_per_s"] for n in ("pytorch-eager", "pytorch-compile")}
        fastest = max(peers, key=lambda n: peers[n])
        for name in ("pytorch-eager", "pytorch-compile", "onnxruntime-fp32"):
            res = cols[name]["results"][i]
            assert res["batch"] == batch and res["fastest_peer"] == fastest
            assert res["vs_fastest_peer"] == pytest.approx(res["images_per_s"] / peers[fastest])
    assert cols["onnxruntime-fp32"]["agreement"]["labels"] == 1.0
    assert "x peer" in r.stdout and "torch.compile: compilation and warm-up" in r.stdout


def test_the_torch_compile_column_says_why_it_cannot_run(untrained_bundle_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import ism_edge_engines.bench_torch
    from ism_edge_cli.bench import _compiled_column

    assert "no --bundle" in _compiled_column(None, 1, "cpu", {}, True).reason
    monkeypatch.setattr(ism_edge_engines.bench_torch, "cxx_compiler", lambda: None)
    column = _compiled_column(untrained_bundle_dir, 1, "cpu", {}, True)
    assert column.factory is None and "C++ compiler" in column.reason


def test_camera_rate_with_several_streams(engine_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "streams.json"
    r = runner.invoke(APP, ["bench", str(engine_dir), "--camera-rate", "--streams", "2", "--seconds", "1",
                            "--fps", "10", "--frame-size", "80x60", "--threads", "1", "--json", str(out)])
    assert r.exit_code == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["streams_count"] == 2 and len(rep["streams"]) == 2 and rep["frames_judged"] >= 2
    assert "per stream" in r.stdout and "2 streams of 80x60 at 10 fps" in r.stdout
    assert "need --camera-rate" in one_error_line(runner.invoke(APP, ["bench", str(engine_dir), "--streams", "2"]))


def test_camera_rate_run(engine_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "stream.json"
    r = runner.invoke(APP, ["bench", str(engine_dir), "--camera-rate", "--seconds", "1.5", "--fps", "10",
                            "--window", "0.5", "--frame-size", "80x60", "--threads", "1",
                            "--json", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["frames_judged"] >= 1 and rep["source"]["fps"] == 10 and rep["source"]["frame_size"] == [60, 80]
    assert {"p50", "p99", "max"} <= set(rep["latency_ms"]) and rep["windows"]
    assert "sustained" in r.stdout and "dropped" in r.stdout


def test_a_bundle_the_engines_were_not_built_from_is_refused(engine_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    raw = {"format": "ism-edge-bundle", "format_version": 1, "config": {}, "class_names": [], "weights": {}}
    (other / "manifest.json").write_text(json.dumps(raw))
    line = one_error_line(runner.invoke(APP, ["bench", str(engine_dir), "--bundle", str(other)]))
    assert str(other) in line and "ism-edge build" in line


def test_a_missing_engine_directory_is_one_error_line(tmp_path: Path) -> None:
    line = one_error_line(runner.invoke(APP, ["bench", str(tmp_path / "nowhere")]))
    assert "nowhere" in line


def test_bad_options(engine_dir: Path) -> None:
    r = runner.invoke(APP, ["bench", str(engine_dir), "--tile-grid", "2x2"])
    assert r.exit_code == ExitCode.USAGE and "--mode tile" in r.stderr
    r = runner.invoke(APP, ["bench", str(engine_dir), "--batch", "0,4"])
    assert r.exit_code == ExitCode.USAGE and ">= 1" in r.stderr


def test_pytorch_eager_flags_with_the_engines_calibrated_thresholds(engine_dir: Path, untrained_bundle_dir: Path,
                                                                    tmp_path: Path) -> None:
    import shutil

    import numpy as np

    from ism_edge import DefenseRuntime
    from ism_edge.bench.frames import camera_frames
    from ism_edge.manifest import SCORE_NAMES, load_manifest
    from tests.ism_edge.conftest import edit_manifest

    engines = tmp_path / "engines"
    shutil.copytree(engine_dir, engines)
    with DefenseRuntime(engines) as rt:  # the bench's inputs: 8 frames of 128x96, resize mode
        verdicts = rt.process_batch(list(camera_frames(8, (96, 128))))
    scores = {k: np.array([v.scores[k] for v in verdicts]) for k in SCORE_NAMES}
    # as if calibrated on this camera: the reconstruction error flags half the frames (a threshold
    # midway between two scores, clear of float noise), the other detectors none
    recon = np.sort(scores["recon_error"])
    calibrated = {"recon_error": float(recon[3] + recon[4]) / 2, "jsd": 1.0, "p_score": 1.0}
    bundle_thresholds = load_manifest(engines).thresholds
    flags = lambda th: np.logical_or.reduce([scores[k] > th[k] for k in SCORE_NAMES])  # noqa: E731
    assert (flags(calibrated) != flags(bundle_thresholds)).any()  # the bundle's thresholds would disagree
    edit_manifest(engines, thresholds=calibrated)

    out = tmp_path / "bench.json"
    r = runner.invoke(APP, ["bench", str(engines), "--bundle", str(untrained_bundle_dir), "--batch", "1,4",
                            "--frames", "8", "--threads", "1", "--frame-size", "128x96",
                            "--json", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    fp32 = {c["name"]: c for c in json.loads(out.read_text())["columns"]}["onnxruntime-fp32"]
    assert fp32["agreement"]["flags"] == 1.0 and fp32["agreement"]["labels"] == 1.0


def test_a_runtime_only_install_runs_the_onnxruntime_columns(engine_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """No torch, no onnx (pip install 'ism-edge[onnxruntime]'), no repository: the default photos are
    the package's, the FP32 column runs, and only the FLOP columns stay empty, with one note."""
    from ism_edge.bench import frames

    for module in ("torch", "onnx"):
        monkeypatch.setitem(sys.modules, module, None)  # import torch / onnx -> ImportError
    assert frames.DEFAULT_PHOTOS.is_relative_to(Path(frames.__file__).parent)  # inside the package, not data/
    out = tmp_path / "bench.json"
    r = runner.invoke(APP, ["bench", str(engine_dir), "--batch", "1", "--frames", "8", "--threads", "1",
                            "--frame-size", "128x96", "--json", str(out)])  # fmt: skip
    assert r.exit_code == ExitCode.OK, r.stderr
    cols = {c["name"]: c for c in json.loads(out.read_text())["columns"]}
    fp32 = cols["onnxruntime-fp32"]
    assert fp32["status"] == "ok" and fp32["results"][0]["images_per_s"] > 0 and fp32["results"][0]["gflops"] is None
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "'onnx'" in notes[0] and "ism-edge[train]" in notes[0]
    assert "GEMM peak without the onnxruntime MatMul probe" in r.stdout and "Traceback" not in r.stdout + r.stderr


def test_the_bench_photos_are_package_data() -> None:
    import tomllib

    from ism_edge.bench import frames

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ism_edge.bench"]
    shipped = sorted(p.name for g in globs for p in (frames.DEFAULT_PHOTOS.parent).glob(g))
    files = sorted(p.name for p in frames.DEFAULT_PHOTOS.iterdir())
    assert shipped == files and len(frames.load_photos()) == 3
    assert sum(p.stat().st_size for p in frames.DEFAULT_PHOTOS.iterdir()) < 200_000  # small: it is in every wheel
