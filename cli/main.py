"""Entry point of ``ism-edge``: one sub-command per module of this package."""

from __future__ import annotations

import typer

from ism_edge.errors import ExitCode
from ism_edge_cli import bench, build, calibrate, evaluate, export, run, train
from ism_edge_cli._common import OneLineErrors


def exit_code_epilog() -> str:
    """The exit codes (ism_edge.errors.ExitCode) as the help's closing paragraph, one per line."""
    lines = [f"{int(code):>3}  {code.meaning}" for code in ExitCode]
    return "Exit codes:\n\n" + "\n".join(lines)


app = typer.Typer(
    cls=OneLineErrors,
    name="ism-edge",
    help="Train, compile and run the instance-sparsity adversarial defense on edge devices.",
    epilog=exit_code_epilog(),
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("train")(train.train)
app.command("evaluate")(evaluate.evaluate)
app.command("export")(export.export)
app.command("build")(build.build)
app.command("run")(run.run)
app.command("calibrate")(calibrate.calibrate)
app.command("bench")(bench.bench)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        from ism_edge import __version__

        typer.echo(f"ism-edge {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:  # plain `ism-edge`: the overview, as --help gives it
        typer.echo(ctx.get_help())
        raise typer.Exit()


MULTI_VALUE_OPTIONS = ("--data",)


def _is_bundle(arg: str) -> bool:
    """Whether ``arg`` is a defense-bundle directory (a positional BUNDLE, never a data path)."""
    from pathlib import Path

    from ism_edge._checks import read_json

    manifest = Path(arg) / "manifest.json"
    try:
        return manifest.is_file() and read_json(manifest).get("format") == "ism-edge-bundle"
    except (OSError, ValueError, AttributeError):
        return False


def expand_multi_value(argv: list[str]) -> list[str]:
    """Rewrite ``--data A B C`` as ``--data A --data B --data C`` (typer options take one value).

    A value that is a defense bundle ends the list: ``evaluate --data test.npz BUNDLE`` keeps BUNDLE
    as the positional argument.
    """
    out: list[str] = []
    current: str | None = None
    for arg in argv:
        if arg in MULTI_VALUE_OPTIONS:
            current = arg
            out.append(arg)
            continue
        if current is not None and _is_bundle(arg) and out and out[-1] != current:
            current = None
        if current is not None and not arg.startswith("-") and out and out[-1] != current:
            out.extend([current, arg])
            continue
        if arg.startswith("-"):
            current = None
        out.append(arg)
    return out


def main() -> None:
    import sys

    app(args=expand_multi_value(sys.argv[1:]), prog_name="ism-edge")


if __name__ == "__main__":
    main()
