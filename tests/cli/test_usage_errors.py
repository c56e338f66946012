"""Usage errors of every command are one `error:` line and exit code 2, not typer's box (issue 18);
every other expected failure has its own documented exit code (issue 16)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ism_edge.errors import BundleError, ExitCode
from ism_edge_cli._common import Terminated, cli_errors, sigterm_interrupts
from ism_edge_cli.main import app
from tests.cli import one_error_line
from tests.conftest import ROOT

runner = CliRunner()


@pytest.mark.parametrize(("args", "expected"), [
    (["calibrate", "E", "V", "--fpr", "0"], "--fpr must be between 0 and 0.5, both excluded, got 0.0"),
    (["calibrate", "E", "V", "--fpr", "nan"], "--fpr must be between 0 and 0.5, both excluded, got nan"),
    (["calibrate", "E", "V", "--fpr", "0.5"], "--fpr must be between 0 and 0.5, both excluded, got 0.5"),
    (["calibrate", "E", "V", "--fpr", "1.5"], "--fpr must be between 0 and 0.5"),
    (["calibrate", "E", "V", "--mode", "tile", "--tile-grid", "abc"], "'abc' is not ROWSxCOLS"),
    (["calibrate", "E", "V", "--mode", "tile", "--tile-grid", "0x0"], "rows and columns must be >= 1"),
    (["calibrate", "E", "V", "--max-frames", "0"], "--max-frames"),
    (["calibrate", "E", "V", "--bogus"], "No such option: --bogus"),
    (["run", "E", "V", "--mode", "tile", "--tile-grid", "abc"], "'abc' is not ROWSxCOLS"),
    (["run", "E", "V", "--max-frames", "0"], "--max-frames"),
    (["run", "E", "A", "B", "--mosaic", "m.mp4", "--mosaic-grid", "1x1"], "has 1 cells for 2 sources"),
    (["run", "E", "A", "B", "--mosaic", "m.mp4", "--mosaic-grid", "2xa"], "'2xa' is not ROWSxCOLS"),
    (["run", "E", "A", "B", "--mosaic", "m.mp4", "--mosaic-grid", "0x3"], "rows and columns must be >= 1"),
    (["run", "E", "A", "B", "--mosaic", "m.mp4", "--mosaic-cell", "8x8"], "each side must be 32 to 4096"),
    (["run", "E", "A", "B", "--mosaic", "m.mp4", "--mosaic-cell", "big"], "'big' is not WIDTHxHEIGHT"),
    (["run", "E", "A", "--mosaic", "m.mp4"], "--mosaic tiles several inputs"),
    (["run", "E", "A", "B", "--mosaic-grid", "2x2"], "give --mosaic OUTPUT too"),
    (["run", "E", "A", "B", "--mosaic", "display://0", "--headless"], "which --headless forbids"),
    (["run", "E", "A", "B", "--mosaic", "m_{source}.mp4"], "drop {source} from it"),
    (["bench", "E", "--bogus"], "No such option: --bogus"),
    (["build", "B", "--out", "O", "--batch", "8,1,1"], "must be MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX"),
    (["build", "B"], "Missing option '--out'"),
    (["export", "B", "--out", "O", "--parity-samples", "0"], "--parity-samples"),
    (["train", "--out", "O"], "Missing option '--data'"),
    (["train", "--data", "D", "--out", "O", "--num-classes", "1"], "--num-classes"),
    # a bundle holds at most 100
    (["train", "--data", "D", "--out", "O", "--feedback-rounds", "101"], "--feedback-rounds"),
    (["run", "E", "A", "--feedback-rounds", "101"], "--feedback-rounds"),
    (["train", "--data", "D", "--out", "O", "--preset", "small", "--sparsity-k", "0"], "sparsity_k must be in"),
    (["train", "--data", "D", "--out", "O", "--preset", "small", "--clf-rank", "500"], "clf_rank must be 0 (full)"),
    (["train", "--data", "D", "--out", "O", "--map-cls", "-1"], "map_cls must be in [0, 100]"),
    (["evaluate"], "Missing argument"),
    (["nosuch"], "No such command 'nosuch'"),
    (["--bogus"], "No such option: --bogus"),
])
def test_a_usage_error_is_one_error_line(args: list[str], expected: str, tmp_path: Path) -> None:
    result = runner.invoke(app, args)
    line = one_error_line(result)
    assert result.exit_code == ExitCode.USAGE and expected in line, line
    assert "╭" not in result.output and "Usage:" not in result.output
    assert "--help'" in line  # where to look for the right usage


def test_fpr_help_states_the_range_the_check_enforces() -> None:
    result = runner.invoke(app, ["calibrate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "0 < FPR < 0.5, both ends excluded" in result.output and "0<=x<=0.5" not in result.output


def test_a_bare_command_still_prints_the_help() -> None:
    result = runner.invoke(app, [])
    assert "Usage:" in result.output and "calibrate" in result.output and "error:" not in result.output


def test_help_lists_every_exit_code() -> None:
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0
    epilog = result.output[result.output.index("Exit codes:"):]
    for code in ExitCode:
        assert f"{int(code):>3}  {code.meaning}" in epilog, code


def test_the_readme_lists_every_exit_code_with_its_name() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Exit codes"):]
    for code in ExitCode:
        assert f"| {int(code)} | `{code.name}` |" in section, code


@pytest.mark.parametrize(("raised", "code", "last_line"), [
    (BundleError("bundle.json is missing"), ExitCode.BAD_INPUT, "error: bundle.json is missing"),
    (MemoryError(), ExitCode.BAD_INPUT, "error: out of memory: lower --batch-size"),
    (KeyboardInterrupt(), ExitCode.INTERRUPTED, "interrupted"),
    (Terminated(signal.SIGTERM), ExitCode.TERMINATED, "stopped by SIGTERM"),
    (Terminated(signal.SIGHUP), ExitCode.HANGUP, "stopped by SIGHUP"),
])
def test_each_expected_failure_has_its_own_exit_code(raised: BaseException, code: ExitCode, last_line: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    @cli_errors
    def command() -> None:
        raise raised

    with pytest.raises(typer.Exit) as exit_info:
        command()
    assert exit_info.value.exit_code == code
    assert capsys.readouterr().err.strip().splitlines() == [last_line]


def test_sigterm_inside_a_compiling_command_is_its_own_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    """train, export and build turn SIGTERM into a clean stop (cleanup runs) with exit code 143."""

    before = signal.getsignal(signal.SIGTERM)

    @cli_errors
    def command() -> None:
        with sigterm_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in this thread before the sleep ends

    with pytest.raises(typer.Exit) as exit_info:
        command()
    assert exit_info.value.exit_code == ExitCode.TERMINATED
    assert capsys.readouterr().err.strip() == "stopped by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before
