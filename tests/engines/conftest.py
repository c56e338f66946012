"""Fixtures of the engine tests: one ONNX export and one ONNX Runtime build of the untrained bundle.

Both go through the CLI (typer's CliRunner), so the CLI tests and the API tests share the work;
64 real CIFAR-10 test images keep each under ~10 s on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engines._cli import CliRun, invoke

PARITY_SAMPLES = "64"


@pytest.fixture(scope="session")
def exported(untrained_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    """`ism-edge export BUNDLE --out DIR` on the untrained bundle."""
    out = tmp_path_factory.mktemp("export") / "onnx"
    return invoke("export", str(untrained_bundle_dir), "--out", str(out), "--parity-samples", PARITY_SAMPLES)


@pytest.fixture(scope="session")
def built(untrained_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    """`ism-edge build BUNDLE --out DIR --backend onnxruntime` on the untrained bundle."""
    out = tmp_path_factory.mktemp("build") / "engines"
    return invoke("build", str(untrained_bundle_dir), "--out", str(out), "--backend", "onnxruntime",
                  "--parity-samples", PARITY_SAMPLES)


@pytest.fixture
def engine_copy(built: CliRun, tmp_path: Path) -> Path:
    """A private copy of the built engine directory, free to corrupt."""
    import shutil

    assert built.exit_code == 0, built.output
    dst = tmp_path / "engines"
    shutil.copytree(built.out, dst)
    return dst
