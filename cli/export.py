"""`ism-edge export`: a defense bundle's networks as ONNX graphs, FP32 and FP16 (docs/engines.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ism_edge_cli._common import cli_errors, sigterm_interrupts


@cli_errors
def export(
    bundle: Annotated[Path, typer.Argument(help="Defense bundle directory (from 'ism-edge train').")],
    out: Annotated[Path, typer.Option("--out", help=(
        "Directory for the ONNX graphs and export.json (replaced atomically)."))],
    parity_samples: Annotated[int, typer.Option(help="Real images for the parity check against PyTorch.", min=1)] = 256,
) -> None:
    """Export the mapping network, classifier and perturbation classifier to ONNX.

    Writes {role}.onnx (FP32, opset 18, dynamic batch axis N, onnx.checker-clean) and
    {role}.fp16.onnx (FP16 compute, FP32 inputs/outputs, reductions and sigmoids in FP32) for the
    mapper, classifier and perturbation roles, checks both against PyTorch on real images and
    stores the parity report in export.json. A graph outside tolerance fails the export.
    """
    from ism_edge_cli.build import StepPrinter, print_parity
    from ism_edge_engines.export import export_bundle

    printer = StepPrinter()
    try:
        with sigterm_interrupts():
            report = export_bundle(bundle, out, parity_samples=parity_samples, on_step=printer)
    finally:
        printer.stop()
    print_parity(report)
    typer.echo(f"ONNX graphs written to {out}")
