"""`ism-edge train` / `evaluate` from the command line: clear errors, outputs written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")

from cli.main import app, expand_multi_value  # noqa: E402
from tests.conftest import CIFAR_TEST  # noqa: E402

runner = CliRunner()


def _one_error_line(result) -> str:
    err = result.stderr.strip().splitlines()
    assert result.exit_code != 0
    assert len(err) == 1 and err[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    return err[0]


def test_missing_dataset_is_one_clear_line(tmp_path: Path) -> None:
    r = runner.invoke(app, ["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "b")])
    assert "does not exist" in _one_error_line(r)
    assert not (tmp_path / "b").exists()


def test_malformed_dataset_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 2)))
    r = runner.invoke(app, ["train", "--data", str(bad), "--out", str(tmp_path / "b")])
    assert "bad.npz" in _one_error_line(r)


def test_missing_bundle_for_evaluate(tmp_path: Path) -> None:
    r = runner.invoke(app, ["evaluate", str(tmp_path / "nope"), "--data", str(CIFAR_TEST)])
    assert "ism-edge train" in _one_error_line(r)


def test_bad_eps_is_a_usage_error(tmp_path: Path, trained_bundle_dir: Path) -> None:
    r = runner.invoke(app, ["evaluate", str(trained_bundle_dir), "--data", str(CIFAR_TEST), "--eps", "2"])
    assert r.exit_code == 2 and "outside [0, 1]" in r.output + r.stderr


def test_evaluate_writes_table_and_json(tmp_path: Path, trained_bundle_dir: Path) -> None:
    out = tmp_path / "eval"
    r = runner.invoke(app, ["evaluate", str(trained_bundle_dir), "--data", str(CIFAR_TEST), "--n", "40",
                            "--eps", "8/255", "--attacks", "fgsm", "--threat", "known", "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output + r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 40 and len(res["cells"]) == 1 and res["bundle"]["sha256"]
    assert "| known | fgsm | 8/255 |" in (out / "results.md").read_text()


def test_data_option_takes_several_values() -> None:
    assert expand_multi_value(["train", "--data", "p1", "p2", "p3", "--out", "b"]) == [
        "train", "--data", "p1", "--data", "p2", "--data", "p3", "--out", "b"]
