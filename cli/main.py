"""Entry point of ``ism-edge``: one sub-command per module of this package."""

from __future__ import annotations

import typer

from cli import build, evaluate, export, run, train

app = typer.Typer(
    name="ism-edge",
    help="Train, compile and run the instance-sparsity adversarial defense on edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("train")(train.train)
app.command("evaluate")(evaluate.evaluate)
app.command("export")(export.export)
app.command("build")(build.build)
app.command("run")(run.run)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        from ism_edge import __version__

        typer.echo(f"ism-edge {__version__}")
        raise typer.Exit()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
