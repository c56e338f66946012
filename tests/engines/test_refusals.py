"""Corrupted, tampered and foreign engine directories are refused with one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from ism_edge.errors import EngineError, EngineMismatchError, ExitCode
from ism_edge.manifest import load_manifest
from tests.engines._cli import invoke

ROOT = Path(__file__).resolve().parents[2]


def _edit_manifest(directory: Path, edit: object) -> None:
    path = directory / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)  # type: ignore[operator]
    path.write_text(json.dumps(raw))


def _one_line_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


@pytest.mark.parametrize(("name", "what"), [("mapper.subpixel.onnx", "mapper source"), ("mapper.onnx", "mapper graph")])
def test_corrupted_onnx_source_is_refused(engine_copy: Path, tmp_path: Path, name: str, what: str) -> None:
    src = engine_copy / "onnx" / name
    src.write_bytes(src.read_bytes()[:1000])
    run = invoke("build", str(engine_copy), "--out", str(tmp_path / "new"))
    assert run.exit_code == ExitCode.BAD_INPUT
    line = _one_line_error(run.output)
    assert f"onnx/{name} ({what}) does not match the hash" in line and "ism-edge build BUNDLE" in line
    assert not (tmp_path / "new").exists()


def test_corrupted_engine_file_is_refused(engine_copy: Path) -> None:
    from ism_edge_engines.ort_build import session

    engine = engine_copy / "classifier.onnx"
    engine.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(EngineError, match=r"classifier\.onnx \(classifier\) does not match the hash .*ism-edge build"):
        load_manifest(engine_copy)
    with pytest.raises(EngineError, match=r"ONNX Runtime cannot load .*classifier\.onnx"):
        session(engine)


def test_tampered_manifest_is_refused(engine_copy: Path, tmp_path: Path) -> None:
    _edit_manifest(engine_copy, lambda m: m["engines"]["mapper"].update(sha256="0" * 64))
    with pytest.raises(EngineError, match=r"mapper\.onnx \(mapper\) does not match the hash .*tampered"):
        load_manifest(engine_copy)
    _edit_manifest(engine_copy, lambda m: m["parity"]["sources"].update({"onnx/perturbation.onnx": "f" * 64}))
    run = invoke("build", str(engine_copy), "--out", str(tmp_path / "new"))
    assert run.exit_code != 0
    assert "onnx/perturbation.onnx (perturbation source) does not match" in _one_line_error(run.output)
    _edit_manifest(engine_copy, lambda m: m["thresholds"].pop("jsd"))
    run = invoke("build", str(engine_copy), "--out", str(tmp_path / "new"))
    assert run.exit_code != 0 and "no threshold for jsd" in _one_line_error(run.output)
    (engine_copy / "manifest.json").write_text("{not json")
    run = invoke("build", str(engine_copy), "--out", str(tmp_path / "new"))
    assert run.exit_code != 0 and "manifest.json is not valid JSON" in _one_line_error(run.output)
    assert not (tmp_path / "new").exists()


def test_manifest_from_another_format_version_is_refused(engine_copy: Path, tmp_path: Path) -> None:
    _edit_manifest(engine_copy, lambda m: m.update(format_version=99))
    run = invoke("build", str(engine_copy), "--out", str(tmp_path / "new"))
    assert run.exit_code == ExitCode.BAD_INPUT
    assert "format version 99 is not supported" in _one_line_error(run.output)
    with pytest.raises(EngineError, match="rebuild the engines with 'ism-edge build'"):
        load_manifest(engine_copy)


def test_engine_from_another_onnxruntime_version_is_refused(engine_copy: Path) -> None:
    from ism_edge.compat import check_compatible

    m = load_manifest(engine_copy)
    check_compatible(m, engine_copy)
    old = replace(m, versions={**m.versions, "onnxruntime": "1.16.3"})
    with pytest.raises(EngineMismatchError) as err:
        check_compatible(old, engine_copy)
    msg = str(err.value)
    assert "built with ONNX Runtime 1.16.3; this machine has" in msg and "--rebuild-on-mismatch" in msg
    assert f"ism-edge build {engine_copy} --out {engine_copy}" in msg and "\n" not in msg
    patch = replace(m, versions={**m.versions, "onnxruntime": m.versions["onnxruntime"].rsplit(".", 1)[0] + ".99"})
    check_compatible(patch, engine_copy)  # a patch release reads the same optimized model


def test_a_runtime_install_without_onnxruntime_names_the_extra(engine_copy: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The base install carries no ONNX Runtime build: the message says which extra to add, not 'rebuild'."""
    from ism_edge import compat
    from ism_edge.errors import MissingDependencyError

    m = load_manifest(engine_copy)
    monkeypatch.setattr(compat, "onnxruntime_version", lambda: None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(MissingDependencyError, match=r"ism-edge\[onnxruntime\]"):
        compat.check_compatible(m, engine_copy)


def test_engine_for_another_gpu_or_tensorrt_is_refused(engine_copy: Path) -> None:
    from ism_edge.compat import check_compatible

    m = load_manifest(engine_copy)
    trt = replace(m, backend="tensorrt", versions={**m.versions, "tensorrt": "10.3.0"},
                  gpu={"name": "Orin", "compute_capability": "8.7"})
    with pytest.raises(EngineMismatchError,
                       match=r"TensorRT 10\.3\.0 on Orin \(8\.7\).*not installed here.*--backend onnxruntime"):
        check_compatible(trt, engine_copy)


def test_engine_from_another_bundle_is_refused(engine_copy: Path, untrained_bundle_dir: Path, tmp_path: Path) -> None:
    import shutil

    from ism_edge.compat import check_compatible

    other = tmp_path / "other-bundle"
    shutil.copytree(untrained_bundle_dir, other)
    _edit_manifest(other, lambda m: m["thresholds"].update(jsd=0.5))
    m = load_manifest(engine_copy)
    check_compatible(m, engine_copy, bundle=untrained_bundle_dir)
    with pytest.raises(EngineMismatchError, match=r"built from another bundle .*ism-edge build .*other-bundle --out"):
        check_compatible(m, engine_copy, bundle=other)


def test_bundle_hash_without_torch_matches_training(untrained_bundle_dir: Path) -> None:
    from ism_edge.compat import bundle_sha256
    from ism_edge_training.bundle import bundle_hash

    assert bundle_sha256(untrained_bundle_dir) == bundle_hash(untrained_bundle_dir)
    code = ("import sys, ism_edge.compat, engines, ism_edge_engines.build, engines.rebuild; "
            "assert 'torch' not in sys.modules and 'onnx' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("command", ["build", "export"])
def test_baseline_bundle_is_refused(command: str, untrained_bundle_dir: Path, tmp_path: Path) -> None:
    """An evaluation baseline (here MagNet: no P, two detectors) is not the chain the engines implement."""
    import shutil

    bundle = tmp_path / "magnet"
    shutil.copytree(untrained_bundle_dir, bundle)
    _edit_manifest(bundle, lambda raw: raw.update(defense={"baseline": "magnet", "reformer": True,
                                                           "detectors": ["recon_error", "jsd"]}))
    run = invoke(command, str(bundle), "--out", str(tmp_path / "out"))
    assert run.exit_code != 0
    assert "evaluation baseline 'magnet'" in _one_line_error(run.output)
    assert not (tmp_path / "out").exists()


def test_tensorrt_engines_are_checked_against_the_gpu_they_run_on(engine_copy: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from ism_edge import compat

    gpus = {0: {"name": "NVIDIA H100", "compute_capability": "9.0"}, 1: {"name": "Orin", "compute_capability": "8.7"}}
    asked: list[int] = []
    monkeypatch.setattr(compat, "tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr(compat, "current_gpu", lambda device=0: asked.append(device) or gpus.get(device))
    m = load_manifest(engine_copy)
    trt = replace(m, backend="tensorrt", versions={**m.versions, "tensorrt": "10.3.0"}, gpu=gpus[1])
    compat.check_compatible(trt, engine_copy, gpu=1)  # built for the Orin, run on device 1: the Orin
    with pytest.raises(EngineMismatchError,
                       match=r"built with TensorRT 10\.3\.0 on Orin \(8\.7\); this machine has .*H100"):
        compat.check_compatible(trt, engine_copy)  # device 0 is another GPU
    assert asked == [1, 0]


def test_rebuild_never_reads_a_file_outside_the_directory(engine_copy: Path, tmp_path: Path) -> None:
    """A manifest naming ``../outside.onnx`` (with its true hash) is refused; a symlink in onnx/
    that the manifest does not name is not copied into the rebuilt directory."""
    from ism_edge._io import sha256_file

    outside = tmp_path / "outside.onnx"
    outside.write_bytes((engine_copy / "onnx" / "mapper.onnx").read_bytes())
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (engine_copy / "onnx" / "notes.onnx").symlink_to(secret)
    run = invoke("build", str(engine_copy), "--out", str(tmp_path / "new"))
    assert run.exit_code == 0, run.output
    assert not (tmp_path / "new" / "onnx" / "notes.onnx").exists()

    _edit_manifest(engine_copy, lambda m: m["engines"]["mapper"].update(onnx="../../outside.onnx"))
    _edit_manifest(engine_copy, lambda m: m["parity"]["sources"].update({"../../outside.onnx": sha256_file(outside)}))
    run = invoke("build", str(engine_copy), "--out", str(tmp_path / "newer"))
    assert run.exit_code == ExitCode.BAD_INPUT
    assert "engines.mapper.onnx must be a plain file name inside the directory" in _one_line_error(run.output)
    assert not (tmp_path / "newer").exists()


def test_rebuild_with_a_malformed_parity_report_still_rebuilds(engine_copy: Path, tmp_path: Path) -> None:
    _edit_manifest(engine_copy, lambda m: m["parity"].update(fp32={"graphs": {"mapper": {"outputs": 5}}}))
    run = invoke("build", str(engine_copy), "--out", str(tmp_path / "new"))
    assert run.exit_code == 0 and "Traceback" not in run.output, run.output
    assert "the parity report in the manifest is malformed" in run.output
    load_manifest(tmp_path / "new")


@pytest.mark.parametrize("command", ["build", "export"])
def test_compiling_a_bundle_without_torch_is_one_line(command: str, untrained_bundle_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An install without the train extra: one line naming it, before anything is written."""
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    run = invoke(command, str(untrained_bundle_dir), "--out", str(tmp_path / "out"))
    assert run.exit_code == ExitCode.BAD_INPUT, run.output
    line = _one_line_error(run.output)
    assert "needs the Python module 'torch', which is not installed: pip install 'ism-edge[train]'" in line
    assert not (tmp_path / "out").exists()


def test_rebuilding_without_onnxruntime_is_one_line(engine_copy: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from ism_edge.errors import MissingDependencyError
    from ism_edge_engines import ort_build

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    run = invoke("build", str(engine_copy), "--out", str(tmp_path / "new"))
    assert run.exit_code == ExitCode.BAD_INPUT, run.output
    line = _one_line_error(run.output)
    assert "rebuilding ONNX Runtime engines needs the Python module 'onnxruntime'" in line
    assert "ism-edge[onnxruntime]" in line
    assert not (tmp_path / "new").exists()
    with pytest.raises(MissingDependencyError, match=r"'onnxruntime'.*ism-edge\[onnxruntime\]"):
        ort_build.optimized_model_from_onnx(engine_copy / "onnx" / "mapper.onnx", tmp_path / "mapper.onnx")
