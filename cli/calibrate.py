"""`ism-edge calibrate`: detector thresholds from clean frames of the deployment's own camera."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ism_edge_cli._common import Backend, Mode, cli_errors, table_console, tile_grid_for
from ism_edge_cli.run import input_uri

if TYPE_CHECKING:
    import numpy as np

    from ism_edge.calibration import Calibration
    from ism_edge.sources import FrameSource


def _frames(source: FrameSource, max_frames: int | None, seconds: float | None) -> Iterator[np.ndarray]:
    """The source's frames until its end, ``max_frames`` or ``seconds`` of reading."""
    deadline = None if seconds is None else time.monotonic() + seconds
    count = 0
    while max_frames is None or count < max_frames:
        if deadline is not None and time.monotonic() >= deadline:
            return
        frame = source.read()
        if frame is None:
            return
        count += 1
        yield frame


def print_calibration(cal: Calibration, *, written: bool) -> None:
    """Before/after thresholds and false-positive rates on the calibration frames, as a table."""
    from rich import box
    from rich.table import Table

    console = table_console()
    grid = f", grid {cal.tile_grid[0]}x{cal.tile_grid[1]}" if cal.tile_grid else ""
    table = Table(title=f"{cal.frames} clean frames of {cal.source} ({cal.mode} mode{grid}), target FPR "
                        f"{cal.target_fpr:.2%} per detector", title_justify="left", box=box.SIMPLE)
    for name in ("detector", "old threshold", "flagged", "new threshold", "flagged"):
        table.add_column(name, justify="left" if name == "detector" else "right")
    for k, after in cal.thresholds.items():
        table.add_row(k, f"{cal.previous[k]:.4g}", f"{cal.fpr_before[k]:.1%}", f"{after:.4g}",
                      f"{cal.fpr_after[k]:.1%}")
    table.add_row("any", "", f"{cal.any_before:.1%}", "", f"{cal.any_after:.1%}")
    console.print(table)
    if not written:
        console.print("dry run: the manifest was not changed")


@cli_errors
def calibrate(
    engine_dir: Annotated[Path, typer.Argument(help=(
        "Engine directory whose thresholds to re-calibrate (its manifest.json is rewritten)."))],
    input: Annotated[str | None, typer.Argument(help=(
        "Clean frames: a video file, an image folder, a stream URI (rtsp://, csi://0), or use --camera."))] = None,
    camera: Annotated[int | None, typer.Option("--camera", help=(
        "Local camera index N (short for INPUT=N)."), min=0)] = None,
    fpr: Annotated[float, typer.Option(help=(
        "Share of clean frames each detector may flag (0 < FPR < 0.5, both ends excluded)."))] = 0.01,
    max_frames: Annotated[int | None, typer.Option(help="Stop after this many frames.", min=1)] = None,
    seconds: Annotated[float | None, typer.Option(help=(
        "Stop after reading for this many seconds (for a live camera)."), min=0.1)] = None,
    mode: Annotated[Mode, typer.Option(help=(
        "The mode 'ism-edge run' will use: resize, or tile (a frame's score is its highest tile's)."))] = Mode.resize,
    tile_grid: Annotated[str | None, typer.Option(help=(
        "Tile mode: resize the frame to ROWSxCOLS tiles first, as 'ism-edge run --tile-grid'."))] = None,
    backend: Annotated[Backend, typer.Option(help=(
        "tensorrt, onnxruntime, or auto (TensorRT when usable)."))] = Backend.auto,
    device: Annotated[str, typer.Option(help="auto, cpu (ONNX Runtime), cuda or cuda:N.")] = "auto",
    batch: Annotated[int, typer.Option(help="Frames judged per call.", min=1)] = 8,
    threads: Annotated[int | None, typer.Option(help=(
        "ONNX Runtime intra-op threads (default: one per core)."), min=1)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the new thresholds without writing them.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help=(
        "Also write the calibration record as JSON to this file."))] = None,
) -> None:
    """Re-calibrate the detector thresholds of an engine directory on clean frames of your camera.

    The bundle's thresholds come from its training images; a camera's frames score differently, so
    clean frames get flagged. This runs the defense (no feedback rounds) on every frame of INPUT —
    frames you know are not attacked, from the camera and scene you deploy on — and sets each
    detector's threshold to the (1 - FPR) quantile of its per-frame score, the rule training uses.
    The manifest is rewritten atomically and keeps the thresholds it replaced; 'ism-edge build'
    from the bundle restores the bundle's. Needs at least 5/FPR frames (500 at the default 1 %).
    """
    import cv2.utils.logging as cv_logging
    from rich.console import Console

    from ism_edge._io import atomic_write_json
    from ism_edge.calibration import apply_calibration, frame_scores, min_frames
    from ism_edge.calibration import calibrate as calibrate_scores
    from ism_edge.errors import OutputError
    from ism_edge.runtime import DefenseRuntime, RuntimeOptions
    from ism_edge.sources import open_source

    cv_logging.setLogLevel(cv_logging.LOG_LEVEL_ERROR)
    uri = input_uri(input, camera, "input of clean frames")
    if not 0.0 < fpr < 0.5:  # NaN fails this too
        raise typer.BadParameter(f"--fpr must be between 0 and 0.5, both excluded, got {fpr}")
    grid = tile_grid_for(mode, tile_grid)
    if max_frames is not None and max_frames < min_frames(fpr):
        raise typer.BadParameter(
            f"--max-frames {max_frames} is below the {min_frames(fpr)} frames a {fpr:.2%} FPR needs")
    try:
        options = RuntimeOptions(backend=backend.value, device=device, mode=mode.value, color_order="BGR",
                                 tile_grid=grid, feedback_rounds=0, threads=threads)
    except ValueError as e:  # e.g. --threads beyond what the cores can use
        raise typer.BadParameter(str(e)) from None
    console = Console(stderr=True, highlight=False)
    with DefenseRuntime(engine_dir, options) as runtime:
        previous = runtime.thresholds
        console.print(f"engines: {engine_dir} — {runtime.describe()}")
        source = open_source(uri)
        try:
            with console.status(f"judging clean frames of {uri} ...") as status:
                scores = frame_scores(runtime, _frames(source, max_frames, seconds), batch=batch,
                                      on_frame=lambda n: status.update(f"judging clean frames of {uri}: {n}"))
        finally:
            source.close()
    if source.skipped:
        console.print(f"skipped {source.skipped} unreadable file(s)")
    cal = calibrate_scores(scores, previous, fpr, mode=mode.value, tile_grid=grid, source=str(uri))
    if not dry_run:
        try:
            apply_calibration(engine_dir, cal)
        except OSError as e:
            raise OutputError(f"cannot rewrite {engine_dir / 'manifest.json'} ({e.strerror or e}): check that the "
                              "engine directory is writable; nothing was changed") from None
    print_calibration(cal, written=not dry_run)
    if json_out is not None:
        try:
            atomic_write_json(json_out, cal.to_json())
        except OSError as e:
            raise OutputError(f"cannot write {json_out} ({e.strerror or e}): check the path") from None
