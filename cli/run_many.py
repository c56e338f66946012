"""`ism-edge run ENGINE_DIR INPUT INPUT ...`: several inputs judged in shared batches by one engine chain.

Separate from ``cli/run.py`` so that the single-input run stays as it was; the per-source outputs
(``OUTPUT`` and ``--purified`` holding ``{source}``), the ``--mosaic`` of every input, the
per-source summary and the source events are this module's.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ism_edge_cli._common import Backend, Mode, parse_grid, tile_grid_for

if TYPE_CHECKING:
    from ism_edge.errors import IsmEdgeError
    from ism_edge.mosaic import Mosaic
    from ism_edge.multi_stream import MultiRunSummary, SourceEvent
    from ism_edge.outputs import OutputPath, OutputURI
    from ism_edge.sources import FrameSource, SourceURI

SOURCE_FIELD = "{source}"


def per_source(text: str, index: int) -> str:
    """``text`` with ``{source}`` replaced by the input's index."""
    return text.replace(SOURCE_FIELD, str(index))


def run_many(
    engine_dir: Path, uris: list[SourceURI], output: str | None, *, log: str, backend: Backend, device: str,
    mode: Mode, tile_grid: str | None, feedback_rounds: int | None, max_frames: int | None, headless: bool,
    purified: Path | None, fps: float | None, realtime: bool, queue_size: int, stall_timeout: float, reconnect: int,
    threads: int | None, rebuild_on_mismatch: bool, summary_json: Path | None, batch_timeout: float,
    fail_on_flag: bool = False, mosaic: str | None = None, mosaic_grid: str | None = None,
    mosaic_cell: str | None = None,
) -> None:
    """The body of ``ism-edge run`` for several inputs (the options are ``run``'s).

    ``--mosaic`` goes with any per-source output: it is written as well (a window of every input
    replaces the windows per input that a run without OUTPUT opens by default)."""
    from datetime import datetime, timezone

    from ism_edge.errors import ExitCode, OutputError, SourceError
    from ism_edge.mosaic import Mosaic
    from ism_edge.multi_stream import MultiStream, SourceOutputs, run_multi_stream
    from ism_edge.outputs import (
        DisplayOutput,
        FrameSink,
        ImageFolderOutput,
        VerdictLog,
        VideoFileOutput,
        check_output_paths,
        new_run_id,
        open_output,
        opencv_has_gui,
        parse_output,
    )
    from ism_edge.sources import ReaderOptions, make_source
    from ism_edge_cli.run import _log_header, _ready_runtime, _runtime_options, _threshold_lines

    n = len(uris)
    layout = _mosaic_layout(n, mosaic_grid, mosaic_cell)
    if mosaic is not None and SOURCE_FIELD in mosaic:
        raise typer.BadParameter(f"--mosaic {mosaic} is one output for all {n} inputs: drop {SOURCE_FIELD} from it")
    mosaic_uri = None if mosaic is None else parse_output(mosaic)
    if output is None and mosaic is None and not headless and opencv_has_gui():
        output = "display://0"
    display = output is not None and output.strip().lower().startswith("display://")
    if display and headless:
        output, display = None, False
    for option, text in (("OUTPUT", None if display else output), ("--purified", None if purified is None
                                                                   else str(purified))):
        if text is not None and SOURCE_FIELD not in text:
            raise OutputError(f"{option} {text} would be written by all {n} inputs: put {SOURCE_FIELD} in it, the "
                              f"input's index (e.g. out_{SOURCE_FIELD}.mp4), or use display://0 (a window per input)")
    out_uris: list[OutputURI | None] = [
        None if output is None or display else parse_output(per_source(output, i)) for i in range(n)
    ]
    folders = [None if purified is None else Path(per_source(str(purified), i)) for i in range(n)]
    paths = _output_paths(out_uris, folders, log, summary_json, mosaic_uri)
    for uri in uris:
        check_output_paths(paths, source=uri.path, source_is_folder=uri.kind == "folder", engine_dir=engine_dir)
    if realtime and (bad := [u for u in uris if u.kind != "video"]):
        raise SourceError(f"--realtime paces video files; {bad[0]} is not one: drop --realtime")
    grid = tile_grid_for(mode, tile_grid)
    options = _runtime_options(backend, device, mode, grid, feedback_rounds, threads)
    try:
        reader_options = ReaderOptions(queue_size=queue_size, stall_timeout=stall_timeout,
                                       reconnect_attempts=reconnect)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None

    runtime = _ready_runtime(engine_dir, options, rebuild_on_mismatch=rebuild_on_mismatch)
    started = datetime.now(timezone.utc)
    run_id = new_run_id(started)
    with runtime:
        typer.echo(f"engines: {engine_dir} — {runtime.describe()}", err=True)
        for line in _threshold_lines(runtime.manifest.calibration, mode, grid):
            typer.echo(line, err=True)
        sources = [_source(make_source(u, read_timeout=stall_timeout), realtime) for u in uris]
        outputs: list[SourceOutputs] = []
        log_out = None
        tiles: Mosaic | None = None
        try:
            if mosaic_uri is not None:
                mosaic_fps = fps or max((r for r in map(_file_fps, uris) if r is not None), default=30.0)
                mosaic_sink = (DisplayOutput("ism-edge mosaic") if mosaic_uri.kind == "display"
                               else open_output(mosaic_uri, fps=mosaic_fps))
                tiles = Mosaic(mosaic_sink, [str(u) for u in uris], grid=layout[0], cell=layout[1])
            for i, (uri, out_uri, folder) in enumerate(zip(uris, out_uris, folders, strict=True)):
                sinks: list[FrameSink] = []
                outputs.append(SourceOutputs(sinks, None))
                if display:
                    sinks.append(DisplayOutput(f"ism-edge {i}: {uri}"))
                elif out_uri is not None:
                    sinks.append(open_output(out_uri, fps=fps or _file_fps(uri) or 30.0))
                outputs[-1].purified = ImageFolderOutput(folder) if folder is not None else None
            log_out = VerdictLog(log, run_id=run_id)
            header = _log_header(runtime, engine_dir, [str(u) for u in uris],
                                 [None if u is None else u.text for u in out_uris], started)
            log_out.write_header(header if mosaic_uri is None else {**header, "mosaic": mosaic_uri.text})
        except BaseException:
            for o in outputs:
                for sink in o.sinks:
                    sink.close()
            if tiles is not None:
                tiles.close()
            raise
        multi = MultiStream(runtime, sources, reader_options=reader_options, batch_timeout=batch_timeout,
                            max_frames=max_frames, purified=purified is not None)
        for i, uri in enumerate(uris):
            where = "" if out_uris[i] is None else f" → {out_uris[i].text}"  # type: ignore[union-attr]
            typer.echo(f"input {i}: {uri}{where}", err=True)
        if tiles is not None and mosaic_uri is not None:
            (rows, cols), (width, height) = tiles.grid, tiles.cell_size
            typer.echo(f"mosaic: {rows}x{cols} cells of {width}x{height} → {mosaic_uri.text}"
                       + (f" ({tiles.sink.encoder.describe()})" if isinstance(tiles.sink, VideoFileOutput) else ""),
                       err=True)
            if isinstance(tiles.sink, VideoFileOutput) and tiles.sink.note:
                typer.echo(f"note: {tiles.sink.note}", err=True)
        typer.echo(f"log: {log}; run {run_id}; batch timeout {batch_timeout * 1e3:g} ms", err=True)
        status = _status_printer() if sys.stderr.isatty() else None
        summary = run_multi_stream(runtime, multi, log=log_out, outputs=outputs, on_event=_echo_event(uris),
                                   status=status, mosaic=tiles)
        if status is not None:
            typer.echo("", err=True)
    print_multi_summary(summary)
    failure = summary.failure
    if summary_json is not None:
        failure = _write_summary(summary_json, summary, failure, run_id)
    if failure is not None:
        raise failure
    if summary.stopped == "interrupted":
        signum = signal.Signals[summary.total.signal] if summary.total.signal else signal.SIGINT
        typer.echo("interrupted" if signum == signal.SIGINT else f"stopped by {signum.name}", err=True)
        raise typer.Exit(128 + signum)
    if fail_on_flag and summary.total.flagged:
        typer.echo(f"flagged: {summary.total.flagged} of {summary.total.frames} frames (--fail-on-flag)", err=True)
        raise typer.Exit(int(ExitCode.FLAGGED))


def _source(source: FrameSource, realtime: bool) -> FrameSource:
    """``--realtime``: a video file paced at its frame rate (opened, like every source, by the run)."""
    from ism_edge.sources import PacedSource

    return PacedSource(source) if realtime else source


def _file_fps(uri: SourceURI) -> float | None:
    """The frame rate a video file reports (for its annotated output), else None."""
    import cv2

    if uri.kind != "video":
        return None
    cap = cv2.VideoCapture(uri.location)
    try:
        rate = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) if cap.isOpened() else 0.0
    finally:
        cap.release()
    return rate if 0.0 < rate < 1000.0 else None


def _mosaic_layout(n: int, grid_text: str | None,
                   cell_text: str | None) -> tuple[tuple[int, int] | None, tuple[int, int]]:
    """``--mosaic-grid ROWSxCOLS`` (None: chosen from the input count) and ``--mosaic-cell WIDTHxHEIGHT``,
    checked before anything loads (a usage error otherwise)."""
    from ism_edge.mosaic import DEFAULT_CELL, check_cell, mosaic_grid

    grid = None if grid_text is None else parse_grid(grid_text, option="--mosaic-grid")
    cell = DEFAULT_CELL if cell_text is None else parse_grid(cell_text, "WIDTHxHEIGHT, e.g. 480x360",
                                                             "width and height", option="--mosaic-cell")
    try:
        mosaic_grid(n, grid)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'--mosaic-grid'") from None
    try:
        cell = check_cell(cell)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'--mosaic-cell'") from None
    return grid, cell


def _output_paths(out_uris: list[OutputURI | None], folders: list[Path | None], log: str,
                  summary_json: Path | None, mosaic: OutputURI | None = None) -> list[OutputPath]:
    from ism_edge.outputs import OutputPath

    paths = [OutputPath(f"OUTPUT of input {i}", Path(u.location), folder=u.kind == "images")
             for i, u in enumerate(out_uris) if u is not None and u.kind != "display"]
    if mosaic is not None and mosaic.kind != "display":
        paths.append(OutputPath("--mosaic", Path(mosaic.location), folder=mosaic.kind == "images"))
    paths += [OutputPath(f"--purified of input {i}", f, folder=True) for i, f in enumerate(folders) if f is not None]
    if log != "-":
        paths.append(OutputPath("--log", Path(log)))
    if summary_json is not None:
        paths.append(OutputPath("--summary-json", summary_json))
    return paths


def _echo_event(uris: list[SourceURI]) -> Callable[[SourceEvent], None]:
    def echo(event: SourceEvent) -> None:
        if event.kind == "max-frames":
            return
        prefix = "warning: " if event.kind in ("retrying", "failed") else ""
        typer.echo(f"{prefix}input {event.source} ({uris[event.source]}): {event.message}", err=True)

    return echo


def print_multi_summary(summary: MultiRunSummary) -> None:
    """One row per input and a total row on stderr, then the files written."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, highlight=False, width=200) if not sys.stderr.isatty() else Console(stderr=True)

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    t = summary.total
    mean = "-" if summary.mean_batch is None else f"{summary.mean_batch:.2f}"
    console.print(f"[bold]summary[/] ({t.source}, {t.backend}, stopped: {t.stopped}; {summary.batches} batches "
                  f"of {mean} frames on average)")
    table = Table()
    for name in ("input", "source", "frames", "flagged", "dropped", "skipped", "reconnects", "p50 ms", "p99 ms",
                 "fps", "stopped"):
        table.add_column(name, justify="left" if name in ("input", "source", "stopped") else "right")
    for i, s in enumerate([*summary.sources, t]):
        table.add_row(str(i) if i < len(summary.sources) else "total", s.source, str(s.frames), str(s.flagged),
                      str(s.dropped), str(s.skipped), str(s.reconnects), ms(s.latency_p50_ms),
                      ms(s.latency_p99_ms), "-" if s.fps is None else f"{s.fps:.1f}", s.stopped)
    console.print(table)
    for s in summary.sources:
        if s.error:
            console.print(f"  {s.source}: {s.error}", markup=False)
    for out in t.outputs:
        where = "stdout" if out["path"] == "-" else out["path"]
        console.print(f"  {out['output']:<8} {out['frames']} frames in {where}"
                      + ("" if out["complete"] else " [bold](incomplete)[/]"))


def _write_summary(path: Path, summary: MultiRunSummary, failure: IsmEdgeError | None,
                   run_id: str) -> IsmEdgeError | None:
    from ism_edge._io import atomic_write_json
    from ism_edge.errors import OutputError

    try:
        atomic_write_json(path, {"run": run_id, **summary.to_json()})
    except OSError as e:
        problem = f"the summary {path} cannot be written ({e.strerror or e}): check free disk space and the path"
        return OutputError(problem if failure is None else f"{failure}; and {problem}")
    return failure


def _status_printer() -> Callable[[MultiRunSummary], None]:
    def show(summary: MultiRunSummary) -> None:
        t = summary.total
        rate = t.frames / t.seconds if t.seconds else 0.0
        sys.stderr.write(f"\r{t.frames} frames of {len(summary.sources)} inputs, {t.flagged} flagged, "
                         f"{t.dropped} dropped, {rate:.1f} FPS   ")
        sys.stderr.flush()

    return show
