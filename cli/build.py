"""`ism-edge build`: compile a defense bundle into TensorRT / ONNX Runtime engines (docs/engines.md)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ism_edge_cli._common import Backend, cli_errors, sigterm_interrupts, table_console


class Precision(str, Enum):
    fp16 = "fp16"
    fp32 = "fp32"
    int8 = "int8"


class StepPrinter:
    """Prints each build step with its duration; a spinner names the step in progress."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self._status: Any = None

    def __call__(self, name: str, seconds: float | None) -> None:
        if seconds is None:
            if self._status is None:
                self._status = self.console.status(name)
                self._status.start()
            else:
                self._status.update(name)
            return
        if name == "total":
            self.stop()
            self.console.print(f"[bold]done[/] in {seconds:.1f} s")
        else:
            self.console.print(f"[green]✓[/] {name} [dim]{seconds:.2f} s[/]")

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


def print_parity(report: dict[str, Any]) -> None:
    """The parity report as a table on stdout: one row per graph output, then the defense.

    A report read back from an edited manifest (a rebuild) may be malformed: it is then skipped
    with a note, since the rebuilt engines come from hash-verified graphs either way.
    """
    console = table_console()
    try:
        _print_parity(console, report)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        console.print("note: the parity report in the manifest is malformed and is not shown; "
                      "'ism-edge build BUNDLE' writes a new one")


def _print_parity(console: Any, report: dict[str, Any]) -> None:
    from rich import box
    from rich.table import Table

    samples = report.get("samples", {})
    table = Table(title=f"parity vs PyTorch on {samples.get('source', '?')}", title_justify="left", box=box.SIMPLE)
    table.add_column("graph")
    table.add_column("output")
    table.add_column("max |Δ| vs limit", justify="right")
    table.add_column("mean |Δ| vs limit", justify="right")
    table.add_column("labels", justify="right")
    table.add_column("flags", justify="right")
    table.add_column("")

    def mark(ok: bool) -> str:
        return "[green]ok[/]" if ok else "[red]FAIL[/]"

    for key in ("fp32", "fp16", "engine"):
        part = report.get(key)
        if not isinstance(part, dict) or "graphs" not in part:
            continue
        name = f"built {part.get('precision', '')}" if key == "engine" else key
        for role, g in part["graphs"].items():
            for out, o in g["outputs"].items():
                label = f"{g['label_agreement']:.1%}" if "label_agreement" in g else ""
                if "max_abs" in o:
                    over = o.get("samples_over_max", 0)
                    rel = "≤" if o["max_abs"] <= o["limit_max_abs"] else f"> ({over} sample{'s' * (over != 1)})"
                    mx = f"{o['max_abs']:.1e} {rel} {o['limit_max_abs']:.1e}"
                    mn = f"{o['mean_abs']:.1e} ≤ {o['limit_mean_abs']:.1e}"
                else:
                    mx, mn = o.get("error", "?"), ""
                table.add_row(f"{name} {role}", out, mx, mn, label, "", mark(o.get("ok", False)))
        d = part["defense"]
        table.add_row(f"{name} defense", f"≥ {d['min_agreement']:.1%} agree", "", "",
                      f"{d['label_agreement']:.1%}", f"{d['flag_agreement']:.1%}", mark(d["ok"]))
    console.print(table)
    if "int8_latency_ms" in report:
        lat = report["int8_latency_ms"]
        parts = [f"{r} {v['fp32']:.2f} → {v['int8']:.2f} ms" for r, v in lat.items() if isinstance(v, dict)]
        console.print(f"INT8 vs FP32 latency at batch {lat['batch']} (ONNX Runtime CPU): " + ", ".join(parts))
        slower = [r for r, v in lat.items() if isinstance(v, dict) and v["int8"] >= v["fp32"]]
        if slower:
            console.print(f"[yellow]warning:[/] INT8 is not faster than FP32 on this CPU for {', '.join(slower)}; "
                          "consider --precision fp32")
    engine = report.get("engine")
    if isinstance(engine, dict) and engine.get("measured") is False:
        console.print(f"note: {engine['reason']}")


def parse_batch(text: str) -> tuple[int, int, int]:
    """Parse ``MIN,OPT,MAX`` batch sizes."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not MIN,OPT,MAX (three integers)") from None
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise typer.BadParameter(f"{text!r} must be MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX")
    return values[0], values[1], values[2]


def _manifest_format(source: Path) -> str | None:
    """``format`` of SOURCE/manifest.json: tells a bundle from an engine directory."""
    from ism_edge._checks import read_json
    from ism_edge.errors import IsmEdgeError

    path = source / "manifest.json"
    if not path.is_file():
        return None
    try:
        raw = read_json(path)
    except (OSError, ValueError) as e:
        raise IsmEdgeError(f"{path} is not valid JSON ({e}): {source} is neither a readable defense bundle nor "
                           "engine directory; retrain the bundle or rebuild the engines from it") from None
    return raw.get("format") if isinstance(raw, dict) else None


@cli_errors
def build(
    source: Annotated[Path, typer.Argument(help=(
        "Defense bundle directory, or an engine directory to rebuild for this machine from its stored ONNX."))],
    out: Annotated[Path, typer.Option("--out", help="Engine directory to write (replaced atomically).")],
    precision: Annotated[Precision | None, typer.Option(help=(
        "Engine precision; default fp16 for TensorRT, fp32 for ONNX Runtime."))] = None,
    backend: Annotated[Backend, typer.Option(help=(
        "tensorrt, onnxruntime, or auto (TensorRT when importable)."))] = Backend.auto,
    batch: Annotated[str, typer.Option(help=(
        "MIN,OPT,MAX batch sizes of the TensorRT optimization profile."))] = "1,8,64",
    workspace: Annotated[int, typer.Option(help="TensorRT workspace memory limit in MB.", min=1)] = 1024,
    timing_cache: Annotated[Path | None, typer.Option(help=(
        "TensorRT timing cache, loaded and saved "
        "(default: one per TensorRT version and GPU under ~/.cache/ism-edge)."))] = None,
    parity_samples: Annotated[int, typer.Option(help="Real images for the parity check against PyTorch.", min=1)] = 256,
) -> None:
    """Compile the mapping network, classifier and perturbation classifier into engines.

    TensorRT (strongly typed network from the FP16 graph) when it is importable, else optimized
    ONNX Runtime models (FP32 by default, optional INT8). Every graph is checked against PyTorch on
    real images first; a graph outside tolerance fails the build. Given an engine directory instead
    of a bundle, recompiles its stored, hash-verified ONNX for this machine.
    """
    from ism_edge_engines.build import build_engines, default_precision, resolve_backend
    from ism_edge_engines.rebuild import rebuild_from_onnx
    from ism_edge_engines.tensorrt_build import default_timing_cache

    profile = parse_batch(batch)
    fmt = _manifest_format(source)
    printer = StepPrinter()
    resolved = resolve_backend(backend.value) if fmt != "ism-edge-engines" or backend != Backend.auto else None
    cache = timing_cache
    if cache is None and resolved == "tensorrt":
        cache = default_timing_cache()
    try:
        with sigterm_interrupts():
            if fmt == "ism-edge-engines":
                manifest = rebuild_from_onnx(source, out_dir=out, backend=resolved, batch=profile,
                                             workspace_mb=workspace, timing_cache=cache, on_step=printer,
                                             precision=precision.value if precision else None)
                report = manifest.parity
            else:
                chosen = precision.value if precision is not None else default_precision(resolved or "auto")
                build_engines(source, out, backend=resolved or "auto", precision=chosen, batch=profile,
                              workspace_mb=workspace, timing_cache=cache, parity_samples=parity_samples,
                              on_step=printer)
                from ism_edge.manifest import load_manifest

                report = load_manifest(out).parity
    finally:
        printer.stop()
    print_parity(report)
    typer.echo(f"engines written to {out}")
