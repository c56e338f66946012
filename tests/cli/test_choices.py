"""Options with a closed set of values, --version, -h and the bare command (issue 16)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import get_args

import pytest
from typer.testing import CliRunner

from ism_edge.errors import ExitCode
from ism_edge_cli.choices import Baseline, DataKind, Finetune, Preset
from ism_edge_cli.main import app
from tests.cli import one_error_line

runner = CliRunner()


def test_the_cli_choices_are_the_training_names() -> None:
    pytest.importorskip("torch")
    from ism_edge_training.bundle import BASELINES
    from ism_edge_training.data.load import KINDS
    from ism_edge_training.models import PRESETS

    assert set(get_args(Preset)) == set(PRESETS)
    assert set(get_args(Baseline)) == set(BASELINES)
    assert get_args(DataKind) == ("auto", *KINDS)
    from ism_edge_training.models.external import FINETUNE_METHODS

    assert get_args(Finetune) == FINETUNE_METHODS


@pytest.mark.parametrize(("args", "expected"), [
    (["train", "--data", "d", "--out", "o", "--preset", "huge"],
     "Invalid value for '--preset': Value error, 'huge' is not one of 'paper', 'medium', 'small'"),
    (["train", "--data", "d", "--out", "o", "--kind", "zip"], "Invalid value for '--kind'"),
    (["evaluate", "B", "--data", "d", "--kind", "zip"], "Invalid value for '--kind'"),
])
def test_a_value_outside_the_choices_is_one_usage_line(args: list[str], expected: str) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == ExitCode.USAGE
    assert expected in one_error_line(r)


def test_version_help_and_the_bare_command() -> None:
    from ism_edge import __version__

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"ism-edge {__version__}"
    for args in (["-h"], []):
        r = runner.invoke(app, args)
        assert r.exit_code == 0 and "Usage: ism-edge" in r.output and "evaluate" in r.output
    r = runner.invoke(app, ["train", "-h"])
    assert r.exit_code == 0 and "<paper|medium|s" in r.output  # the choices, wrapped by the help box


@pytest.mark.parametrize(("args", "purpose"), [
    (["train", "--data", "d.npz", "--out", "o"], "training a defense"),
    (["evaluate", "B", "--data", "d.npz"], "evaluating a defense"),
])
def test_training_side_commands_in_a_runtime_only_install_say_which_extra(
        args: list[str], purpose: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)  # as if `pip install ism-edge` without [train]
    r = runner.invoke(app, args)
    assert r.exit_code != 0
    assert one_error_line(r) == (f"error: {purpose} needs the Python module 'torch', which is not installed: "
                                 "pip install 'ism-edge[train]'")
    assert not any(tmp_path.iterdir())
