"""Running ``ism-edge`` in-process for the engine tests (typer's CliRunner)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CliRun:
    out: Path
    exit_code: int
    output: str


def invoke(*args: str) -> CliRun:
    from typer.testing import CliRunner

    from ism_edge_cli.main import app

    result = CliRunner().invoke(app, list(args))
    out = Path(args[args.index("--out") + 1]) if "--out" in args else Path()
    return CliRun(out=out, exit_code=result.exit_code, output=result.output)
