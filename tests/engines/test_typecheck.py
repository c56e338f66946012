"""mypy on the TensorRT builder against tensorrt-stubs, and proof that the check is not vacuous."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("mypy")
pytest.importorskip("tensorrt_stubs")
ROOT = Path(__file__).resolve().parents[2]

WRONG = '''
import tensorrt as trt


def build(path: str) -> None:
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, builder)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, "1GB")
    config.set_flag(trt.BuilderFlag.FP16_STRONG)
    builder.build_serialized_network(network)
'''


def test_tensorrt_builder_passes_mypy_with_tensorrt_stubs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ism_edge_engines.typecheck import run_mypy

    wrong = tmp_path / "wrong_trt.py"
    wrong.write_text(WRONG)
    monkeypatch.chdir(ROOT)
    report, status = run_mypy(["engines/tensorrt_build.py", str(wrong)])
    assert "engines/tensorrt_build.py" not in report, report
    # Each misuse of the TensorRT API in WRONG is caught: the stubs are really read.
    for line in (8, 10, 11, 12):
        assert f"wrong_trt.py:{line}: error" in report, report
    assert status == 1 and "Found 4 errors in 1 file" in report


def test_make_typecheck_invocation_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the Makefile's `typecheck` target runs on this module (it skips the unmarked stubs)."""
    from mypy import api

    monkeypatch.chdir(ROOT)
    out, err, status = api.run(["--config-file", "pyproject.toml", "engines/tensorrt_build.py"])
    assert status == 0, out + err
