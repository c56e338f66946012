"""`ism-edge run`: filter a camera, stream, video or image folder through the compiled defense (docs/runtime.md)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ism_edge_cli._common import Backend, Mode, cli_errors, tile_grid_for

if TYPE_CHECKING:
    from ism_edge.camera_loop import RunSummary
    from ism_edge.errors import IsmEdgeError
    from ism_edge.outputs import OutputPath, OutputURI
    from ism_edge.runtime import DefenseRuntime, RuntimeOptions
    from ism_edge.sources import FrameSource, SourceURI


def input_uri(input: str | None, camera: int | None, what: str = "input") -> SourceURI:
    """The source of INPUT or --camera N: exactly one of them (a one-line SourceError otherwise)."""
    from ism_edge.errors import SourceError
    from ism_edge.sources import parse_source

    if (input is None) == (camera is None):
        raise SourceError(
            f"give exactly one {what}: a video file, an image folder, a URI such as rtsp://…, or --camera N")
    return parse_source(camera if camera is not None else str(input))


def split_arguments(args: list[str], cameras: list[int], output: str | None,
                    *, mosaic: bool = False) -> tuple[list[SourceURI], str | None]:
    """The inputs and the OUTPUT of ``run``'s arguments, ``--camera`` options and ``--output``.

    ``INPUT OUTPUT`` (two arguments) keeps its meaning from single-input runs unless the second is
    a live source (a camera, device or stream, which cannot be an output) or ``--mosaic`` is given
    (a mosaic tiles several inputs); with more arguments only a last ``display://N`` or one
    holding ``{source}`` is the OUTPUT. ``--output`` makes every argument an input (``--output
    none``: no annotated output).
    """
    from ism_edge.errors import SourceError
    from ism_edge.sources import parse_source

    if args and cameras:
        raise SourceError("give exactly one input list: INPUT arguments or --camera N options, not both "
                          "(a camera can be an INPUT: its index N)")
    inputs = list(args)
    if output is None and len(inputs) == 2 and not mosaic and not _live(inputs[1]):
        output = inputs.pop()
    elif output is None and len(inputs) > (1 if mosaic else 2) and (inputs[-1].startswith("display://")
                                                                    or "{source}" in inputs[-1]):
        output = inputs.pop()
    if output is not None and output.strip().lower() == "none":
        output = None
    uris = [parse_source(c) for c in cameras] if cameras else [parse_source(i) for i in inputs]
    if not uris:
        raise SourceError(
            "give exactly one input: a video file, an image folder, a URI such as rtsp://…, or --camera N "
            "(or several, to judge them in shared batches)")
    return uris, output


def _live(text: str) -> bool:
    """Whether an argument names a live source (which cannot be an output)."""
    from ism_edge.errors import SourceError
    from ism_edge.sources import parse_source

    try:
        return parse_source(text).live
    except SourceError:  # display://0 and other output-only URIs
        return False


def load_runtime(engine_dir: Path, options: RuntimeOptions, *, rebuild_on_mismatch: bool) -> DefenseRuntime:
    """Load the runtime; on a version/GPU mismatch optionally recompile the stored ONNX first."""
    from ism_edge.errors import EngineMismatchError
    from ism_edge.runtime import DefenseRuntime

    try:
        return DefenseRuntime(engine_dir, options)
    except EngineMismatchError as e:
        if not rebuild_on_mismatch:
            raise
        typer.echo(f"{e}\nrebuilding {engine_dir} for this machine from its stored ONNX ...", err=True)
    from ism_edge_engines.rebuild import rebuild_from_onnx

    rebuild_from_onnx(engine_dir)
    return DefenseRuntime(engine_dir, options)


def _ready_runtime(engine_dir: Path, options: RuntimeOptions, *, rebuild_on_mismatch: bool) -> DefenseRuntime:
    """Load the engines and judge one grey frame, so that every buffer exists before a source or
    output is opened; engines whose batch buffers do not fit in memory are a one-line error."""
    import numpy as np

    from ism_edge.errors import EngineError

    runtime: DefenseRuntime | None = None
    try:
        runtime = load_runtime(engine_dir, options, rebuild_on_mismatch=rebuild_on_mismatch)
        _, h, w = runtime.input_shape
        runtime.process(np.full((h, w, 3), 128, np.uint8))
    except MemoryError:
        max_batch = _max_batch(engine_dir, runtime)
        if runtime is not None:
            runtime.close()
        raise EngineError(
            f"out of memory loading the engines of {engine_dir}: they take batches of up to {max_batch} inputs "
            "(the MAX of 'ism-edge build --batch MIN,OPT,MAX'), and the buffers for that many do not fit; "
            f"rebuild them with a smaller MAX: ism-edge build {engine_dir} --out NEW_DIR --batch 1,8,64"
        ) from None
    return runtime


def _max_batch(engine_dir: Path, runtime: DefenseRuntime | None) -> str:
    """The engines' largest batch, for an error message (``?`` when the manifest cannot say)."""
    from ism_edge.manifest import load_manifest

    try:
        manifest = runtime.manifest if runtime is not None else load_manifest(engine_dir, verify_files=False)
        return f"{int(manifest.batch['max']):,}"
    except Exception:  # noqa: BLE001 - only for the message
        return "?"


def print_summary(summary: RunSummary) -> None:
    """The run's summary on stderr, one fact per line."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False)

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} ms"

    console.print(f"[bold]summary[/] ({summary.source}, {summary.backend}, stopped: {summary.stopped})")
    console.print(f"  frames   {summary.frames}")
    console.print(f"  flagged  {summary.flagged}")
    console.print(f"  dropped  {summary.dropped}")
    console.print(f"  skipped  {summary.skipped}")
    if summary.reconnects:
        console.print(f"  reconnects {summary.reconnects}")
    console.print(f"  latency  p50 {ms(summary.latency_p50_ms)}, p99 {ms(summary.latency_p99_ms)}")
    console.print(f"  fps      {'-' if summary.fps is None else f'{summary.fps:.1f}'}")
    for out in summary.outputs:
        where = "stdout" if out["path"] == "-" else out["path"]
        console.print(f"  {out['output']:<8} {out['frames']} frames in {where}"
                      + ("" if out["complete"] else " [bold](incomplete)[/]"))


@cli_errors
def run(
    engine_dir: Annotated[Path, typer.Argument(help="Engine directory written by 'ism-edge build'.")],
    args: Annotated[list[str] | None, typer.Argument(metavar="INPUT... [OUTPUT]", help=(
        "Inputs: video files, image folders or URIs (file://video.mp4, v4l2:///dev/video0, csi://0, "
        "rtsp://host/stream, N for camera N); several are batched through one engine chain. Then the annotated "
        "OUTPUT: file://out.mp4 (.mp4/.avi/.mkv), a folder for images, or display://0 (default: a window when "
        "OpenCV has a GUI). With one input, a second argument is the OUTPUT (unless it is a live source); with "
        "more, only a last display://N or one holding {source} is; --output names it in every case."))] = None,
    camera: Annotated[list[int] | None, typer.Option("--camera", help=(
        "Local camera index N (short for INPUT=N); repeat it for several cameras."), min=0)] = None,
    output_opt: Annotated[str | None, typer.Option("--output", help=(
        "The annotated OUTPUT (then every argument is an input). With several inputs it holds {source}, "
        "the input's index (out_{source}.mp4), or is display://0 (a window per input); 'none': no output."))] = None,
    batch_timeout: Annotated[float, typer.Option(help=(
        "Several inputs: milliseconds a batch waits, after its first frame, for a frame of every other input "
        "(a slow or dead input never holds the others back longer)."), min=0.0)] = 20.0,
    log: Annotated[str, typer.Option("--log", help=(
        "JSON-lines verdict log, appended and flushed per frame ('-': stdout)."))] = "-",
    backend: Annotated[Backend, typer.Option(help=(
        "tensorrt, onnxruntime, or auto (TensorRT when usable)."))] = Backend.auto,
    device: Annotated[str, typer.Option(help="auto, cpu (ONNX Runtime), cuda or cuda:N.")] = "auto",
    mode: Annotated[Mode, typer.Option(help=(
        "resize: the whole frame to the model size; tile: model-size tiles and a heat map."))] = Mode.resize,
    tile_grid: Annotated[str | None, typer.Option(help=(
        "Tile mode: resize the frame to ROWSxCOLS tiles first (default: native resolution)."))] = None,
    feedback_rounds: Annotated[int | None, typer.Option(help=(
        "Feedback-reformation rounds (default: the engine manifest's; at most 100)."), min=0, max=100)] = None,
    max_frames: Annotated[int | None, typer.Option(help=(
        "Stop after this many frames (with several inputs: of each input)."), min=1)] = None,
    headless: Annotated[bool, typer.Option("--headless", help="Never open a window.")] = False,
    purified: Annotated[Path | None, typer.Option(help=(
        "Also write each frame's purified image (x̂) into this folder (with several inputs: holding {source})."))
        ] = None,
    fps: Annotated[float | None, typer.Option(help=(
        "Frame rate of the output video (default: the source's, else 30)."), min=0.1)] = None,
    realtime: Annotated[bool, typer.Option("--realtime", help=(
        "Play a video file at its frame rate, like a live camera: "
        "frames the defense cannot keep up with are dropped and counted."))] = False,
    queue_size: Annotated[int, typer.Option(help=(
        "Frames buffered from a live source (the oldest is dropped beyond it)."), min=1)] = 2,
    stall_timeout: Annotated[float, typer.Option(help=(
        "Seconds without a frame before the source counts as stalled "
        "(a live source is then reopened like a lost one)."), min=0.01)] = 10.0,
    reconnect: Annotated[int, typer.Option(help=(
        "Reconnection attempts (exponential backoff) when a live source is lost."), min=0)] = 5,
    threads: Annotated[int | None, typer.Option(help=(
        "ONNX Runtime intra-op threads (default: one per core)."), min=1)] = None,
    rebuild_on_mismatch: Annotated[bool, typer.Option(help=(
        "If the engines were built for another runtime version or GPU, "
        "recompile their stored ONNX here first."))] = False,
    summary_json: Annotated[Path | None, typer.Option(help="Also write the summary as JSON to this file.")] = None,
    fail_on_flag: Annotated[bool, typer.Option("--fail-on-flag", help=(
        "Exit with code 4 when any frame was flagged (after writing every output as usual), "
        "for scripts and CI jobs."))] = False,
    mosaic: Annotated[str | None, typer.Option("--mosaic", help=(
        "Several inputs: also one tiled picture of them all, one frame per batch: file://wall.mp4, a folder for "
        "images, or display://0 (a window; then no window per input unless OUTPUT asks for them). Each input's cell "
        "shows its latest annotated frame, its index and name, or 'no signal', 'ended', 'failed'."))] = None,
    mosaic_grid: Annotated[str | None, typer.Option(help=(
        "ROWSxCOLS of the --mosaic (default: ceil(sqrt(N)) columns and the rows they need)."))] = None,
    mosaic_cell: Annotated[str | None, typer.Option(help=(
        "WIDTHxHEIGHT in pixels of each --mosaic cell (default 640x480); frames are scaled to fit, keeping "
        "their aspect ratio."))] = None,
) -> None:
    """Judge every frame of a camera, stream, video or image folder with the compiled defense.

    Writes one JSON verdict per frame (label, confidence, detector scores, flagged, timings) to the
    log as soon as it is known, draws the verdict on the frames (green border: clean, red:
    flagged; a heat map in tile mode), and prints a summary at exit. With several inputs, each has
    its own reader, queue and reconnection, their frames are judged in shared batches, every log
    line names its `source`, and the summary is per input and in total; an input that cannot be
    opened or is lost leaves the run (reported; a live one is retried) while the others go on.
    Ctrl-C, SIGTERM and SIGHUP stop cleanly (the video is finalised, the summary written; exit 130, 143, 129).
    With --fail-on-flag a run that flagged any frame exits 4 ('ism-edge --help' lists every exit code).
    """
    import cv2.utils.logging as cv_logging

    from ism_edge.camera_loop import RunOptions, run_camera_loop
    from ism_edge.errors import ExitCode, exit_code_for_signal
    from ism_edge.outputs import (
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
    from ism_edge.sources import FrameReader, ReaderOptions, open_source

    cv_logging.setLogLevel(cv_logging.LOG_LEVEL_ERROR)
    source_uris, output = split_arguments(args or [], camera or [], output_opt, mosaic=mosaic is not None)
    if mosaic is not None and headless and mosaic.strip().lower().startswith("display://"):
        raise typer.BadParameter(f"--mosaic {mosaic} opens a window, which --headless forbids: write the mosaic "
                                 "to a file (file://wall.mp4) or a folder")
    headless = headless or (output_opt is not None and output_opt.strip().lower() == "none")  # no window either
    if mosaic is None and (mosaic_grid is not None or mosaic_cell is not None):
        raise typer.BadParameter("--mosaic-grid and --mosaic-cell shape the --mosaic: give --mosaic OUTPUT too")
    if mosaic is not None and len(source_uris) == 1:
        raise typer.BadParameter(f"--mosaic tiles several inputs, and {source_uris[0]} is the only one: give more "
                                 "inputs, or write this one's annotated OUTPUT")
    if len(source_uris) > 1:
        from ism_edge_cli.run_many import run_many

        run_many(
            engine_dir, source_uris, output, log=log, backend=backend, device=device, mode=mode, tile_grid=tile_grid,
            feedback_rounds=feedback_rounds, max_frames=max_frames, headless=headless, purified=purified, fps=fps,
            realtime=realtime, queue_size=queue_size, stall_timeout=stall_timeout, reconnect=reconnect,
            threads=threads, rebuild_on_mismatch=rebuild_on_mismatch, summary_json=summary_json,
            batch_timeout=batch_timeout / 1e3, fail_on_flag=fail_on_flag, mosaic=mosaic, mosaic_grid=mosaic_grid,
            mosaic_cell=mosaic_cell,
        )  # fmt: skip
        return
    source_uri = source_uris[0]
    out_uri = parse_output(output) if output is not None else None
    if out_uri is None and not headless and opencv_has_gui():
        out_uri = parse_output("display://0")
    if out_uri is not None and out_uri.kind == "display" and headless:
        out_uri = None
    grid = tile_grid_for(mode, tile_grid)
    check_output_paths(_output_paths(out_uri, log, summary_json, purified), source=source_uri.path,
                       source_is_folder=source_uri.kind == "folder", engine_dir=engine_dir)
    options = _runtime_options(backend, device, mode, grid, feedback_rounds, threads)
    runtime = _ready_runtime(engine_dir, options, rebuild_on_mismatch=rebuild_on_mismatch)
    started = datetime.now(timezone.utc)
    run_id = new_run_id(started)
    with runtime:
        typer.echo(f"engines: {engine_dir} — {runtime.describe()}", err=True)
        for line in _threshold_lines(runtime.manifest.calibration, mode, grid):
            typer.echo(line, err=True)
        source = open_source(source_uri, read_timeout=stall_timeout)
        if realtime:
            source = _paced(source)
        sinks: list[FrameSink] = []
        log_out = None
        try:
            if out_uri is not None:
                sinks.append(open_output(out_uri, fps=fps or source.fps or 30.0))
            purified_out = ImageFolderOutput(purified) if purified is not None else None
            log_out = VerdictLog(log, run_id=run_id)
            log_out.write_header(_log_header(runtime, engine_dir, str(source_uri),
                                             None if out_uri is None else out_uri.text, started))
        except BaseException:
            for sink in sinks:
                sink.close()
            source.close()
            raise
        reader = FrameReader(
            source,
            ReaderOptions(queue_size=queue_size, stall_timeout=stall_timeout, reconnect_attempts=reconnect),
        )
        video = next((sink for sink in sinks if isinstance(sink, VideoFileOutput)), None)
        typer.echo(f"input: {source_uri}" + (f" → {out_uri.text}" if out_uri else "")
                   + (f" ({video.encoder.describe()})" if video is not None else "") + f"; log: {log}; run {run_id}",
                   err=True)
        if video is not None and video.note:
            typer.echo(f"note: {video.note}", err=True)
        status = _status_printer() if sys.stderr.isatty() else None
        summary = run_camera_loop(
            runtime, reader, log=log_out, sinks=sinks, purified=purified_out,
            options=RunOptions(max_frames=max_frames), status=status,
        )  # fmt: skip
        if status is not None:
            typer.echo("", err=True)
    print_summary(summary)
    failure = summary.failure
    if summary_json is not None:
        failure = _write_summary(summary_json, {"run": run_id, **summary.to_json()}, failure)
    if failure is not None:
        raise failure
    if summary.stopped == "interrupted":
        signum = signal.Signals[summary.signal] if summary.signal else signal.SIGINT
        typer.echo("interrupted" if signum == signal.SIGINT else f"stopped by {signum.name}", err=True)
        raise typer.Exit(int(exit_code_for_signal(signum)))  # the shell's code for a death by it (130, 143, 129)
    if fail_on_flag and summary.flagged:
        typer.echo(f"flagged: {summary.flagged} of {summary.frames} frames (--fail-on-flag)", err=True)
        raise typer.Exit(int(ExitCode.FLAGGED))


def _runtime_options(backend: Backend, device: str, mode: Mode, grid: tuple[int, int] | None,
                     feedback_rounds: int | None, threads: int | None) -> RuntimeOptions:
    """The runtime's options from ``run``'s, for one input or several (frames come from OpenCV: BGR)."""
    from ism_edge.runtime import RuntimeOptions

    try:
        return RuntimeOptions(
            backend=backend.value, device=device, mode=mode.value, color_order="BGR", tile_grid=grid,
            feedback_rounds=feedback_rounds, threads=threads,
        )  # fmt: skip
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def _output_paths(out_uri: OutputURI | None, log: str, summary_json: Path | None,
                  purified: Path | None) -> list[OutputPath]:
    """Every file or folder the run will write, with the option that named it."""
    from ism_edge.outputs import OutputPath

    paths = []
    if out_uri is not None and out_uri.kind != "display":
        paths.append(OutputPath("OUTPUT", Path(out_uri.location), folder=out_uri.kind == "images"))
    if log != "-":
        paths.append(OutputPath("--log", Path(log)))
    if summary_json is not None:
        paths.append(OutputPath("--summary-json", summary_json))
    if purified is not None:
        paths.append(OutputPath("--purified", purified, folder=True))
    return paths


def _log_header(runtime: DefenseRuntime, engine_dir: Path, source: str | list[str],
                output: str | None | list[str | None], started: datetime) -> dict[str, Any]:
    """The verdict log's ``"event": "start"`` line: what tells this run from others in the same file.

    ``source`` and ``output`` are lists, in input order, for a run with several inputs.
    """
    from ism_edge import __version__

    return {
        "started": started.isoformat(timespec="seconds"), "ism_edge": __version__,
        "engine_dir": str(engine_dir.resolve()), "source": source,
        "output": output, "backend": runtime.describe(),
        "thresholds": dict(runtime.manifest.thresholds),
    }  # fmt: skip


def _write_summary(path: Path, summary: dict[str, Any], failure: IsmEdgeError | None) -> IsmEdgeError | None:
    """Write ``--summary-json`` (atomically); the run's failure, joined by this one's if it fails too."""
    from ism_edge._io import atomic_write_json
    from ism_edge.errors import OutputError

    try:
        atomic_write_json(path, summary)
    except OSError as e:
        problem = f"the summary {path} cannot be written ({e.strerror or e}): check free disk space and the path"
        return OutputError(problem if failure is None else f"{failure}; and {problem}")
    return failure


def _threshold_lines(cal: dict[str, Any], mode: Mode, grid: tuple[int, int] | None) -> list[str]:
    """Where the thresholds come from, and a warning when they were calibrated for another mode."""
    if not cal:
        return ["thresholds: the bundle's (its held-out training images; "
                "'ism-edge calibrate' fits them to this camera)"]
    lines = [f"thresholds: calibrated on {cal.get('frames')} clean frames of {cal.get('source')} at "
             f"{cal.get('target_fpr', 0):.2%} per detector ({cal.get('created', '?')})"]
    if (cal.get("mode"), cal.get("tile_grid")) != (mode.value, list(grid) if grid else None):
        grid_text = f" --tile-grid {cal['tile_grid'][0]}x{cal['tile_grid'][1]}" if cal.get("tile_grid") else ""
        lines.append(f"warning: the thresholds were calibrated in {cal.get('mode')} mode{grid_text}; "
                     "re-run 'ism-edge calibrate' with this run's mode for its false-positive rate to hold")
    return lines


def _paced(source: FrameSource) -> FrameSource:
    """``--realtime``: the video file's frames released on its clock (ism_edge.sources.PacedSource)."""
    from ism_edge.errors import SourceError
    from ism_edge.sources import PacedSource

    if source.live or source.uri.kind != "video":
        source.close()
        raise SourceError(f"--realtime paces a video file; {source.uri} is "
                          f"{'already live' if source.live else 'not a video'}: drop --realtime")
    paced = PacedSource(source)
    try:
        paced.open()
    except BaseException:
        source.close()
        raise
    return paced


def _status_printer() -> Callable[[RunSummary], None]:
    """A one-line status (frames, flagged, dropped, FPS) rewritten in place on a terminal."""

    def show(summary: RunSummary) -> None:
        rate = summary.frames / summary.seconds if summary.seconds else 0.0
        sys.stderr.write(f"\r{summary.frames} frames, {summary.flagged} flagged, {summary.dropped} dropped, "
                         f"{rate:.1f} FPS   ")
        sys.stderr.flush()

    return show
