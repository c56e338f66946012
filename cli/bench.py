"""`ism-edge bench`: the defense chain side by side (PyTorch eager, ONNX Runtime, TensorRT), and at camera rate
(docs/performance.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from ism_edge_cli._common import Mode, cli_errors, parse_grid, table_console, tile_grid_for


def parse_batches(text: str) -> tuple[int, ...]:
    """Parse ``1,8,32,128`` (model inputs per call)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of batch sizes, e.g. 1,8,32,128") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{text!r}: batch sizes must be integers >= 1")
    return values


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``WIDTHxHEIGHT`` (e.g. ``640x480``) into (height, width)."""
    width, height = parse_grid(text, "WIDTHxHEIGHT, e.g. 640x480", "width and height")
    return height, width


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _console() -> Any:
    return table_console()


def print_chain_report(report: dict[str, Any]) -> None:
    """The chain report as tables on stdout (one row per column and batch size)."""
    from rich.table import Table

    from ism_edge.bench.chain import prep_text

    console = _console()
    m, cfg = report["machine"], report["config"]
    console.print(f"[bold]machine[/] {m['cpu']}, {m['cores_available']} cores, {m['threads']} threads; "
                  f"int8 dot product: {', '.join(m['int8_dot_product']) or 'none'}")
    flops, peak = report.get("flops"), report.get("peak")
    if flops:
        g = flops["graphs"]
        console.print(f"[bold]FLOPs[/] per model input {flops['per_input'] / 1e6:.2f} M "
                      f"(mapper {g['mapper']['flops'] / 1e6:.2f} M + "
                      f"2 x classifier {g['classifier']['flops'] / 1e6:.2f} M + "
                      f"perturbation {g['perturbation']['flops'] / 1e6:.2f} M; 1 MAC = 2 FLOPs)")
    if peak:
        probes = ", ".join(f"{p['name']} {p['gflops']:.1f}" for p in peak["probes"])
        console.print(f"[bold]GEMM peak[/] {peak['gflops']:.1f} GFLOP/s ({probes}; n = {peak['probes'][0]['size']})")
        for name, why in peak.get("skipped", {}).items():
            console.print(f"GEMM peak without the {name} probe: {why}", markup=False)
    inp = report["inputs"]
    console.print(f"[bold]inputs[/] {cfg['mode']} mode, {cfg['frame_size'][1]}x{cfg['frame_size'][0]} frames, "
                  f"{inp['tiles_per_frame']} model input(s) per frame, "
                  f"preprocessing {prep_text(inp['preprocess_ms_per_input'])}")
    table = Table(title="defense chain: per call of BATCH model inputs (times in ms)")
    for name in ("chain", "batch", "img/s", "p50", "p99", "prep", "upload", "map", "clf", "det", "down", "other",
                 "x eager", "x peer", "GFLOP/s", "% peak"):
        table.add_column(name, justify="left" if name == "chain" else "right")
    for col in report["columns"]:
        for r in col["results"]:
            s = r["stages_ms"]
            table.add_row(
                col["title"], str(r["batch"]), f"{r['images_per_s']:.0f}",
                f"{r['latency_ms']['p50']:.2f}", f"{r['latency_ms']['p99']:.2f}",
                *(f"{s[k]:.2f}" for k in ("preprocess", "upload", "mapping", "classifier", "detectors", "download",
                                          "other")),
                _num(r["vs_eager"], ".2f"), _num(r.get("vs_fastest_peer"), ".2f"), _num(r["gflops"], ".1f"),
                _num(None if r["peak_share"] is None else 100 * r["peak_share"], ".1f"),
            )  # fmt: skip
    console.print(table)
    console.print("x peer: throughput over the fastest PyTorch column at that batch (eager or torch.compile)")
    for col in report["columns"]:
        if col["status"] != "ok":
            console.print(f"{col['title']}: {col['reason']}", markup=False)
        compiled = [(r["batch"], r["compile_s"]) for r in col["results"] if "compile_s" in r]
        if compiled:
            console.print(f"{col['title']}: compilation and warm-up "
                          + ", ".join(f"{s:.1f} s at batch {b}" for b, s in compiled)
                          + " (the first call at each batch; not in the timed calls)", markup=False)
    for col in report["columns"]:
        a = col.get("agreement")
        if a and col["name"] != a["against"]:
            console.print(f"agreement of {col['title']} with {a['against']} on {a['inputs']} inputs: "
                          f"labels {100 * a['labels']:.1f} %, flags {100 * a['flags']:.1f} %")
    best = report.get("best_peak_share")
    if best:
        console.print(f"best share of the GEMM peak: {100 * best['peak_share']:.1f} % "
                      f"({best['column']}, batch {best['batch']}, {best['gflops']:.1f} GFLOP/s)")


def print_stream_report(report: dict[str, Any]) -> None:
    """The camera-rate report: summary line and per-window latencies."""
    from rich.table import Table

    console = _console()
    lat = report["latency_ms"]
    console.print(f"[bold]camera rate[/] {report['mode']} mode, "
                  f"{report['source']['frame_size'][1]}x{report['source']['frame_size'][0]} "
                  f"at {report['source']['fps']:g} fps for {report['seconds']:.0f} s — {report['runtime']}")
    console.print(f"  sustained {_num(report['sustained_fps'], '.1f')} FPS, latency p50 {_num(lat['p50'], '.1f')} ms, "
                  f"p99 {_num(lat['p99'], '.1f')} ms, max {_num(lat['max'], '.1f')} ms; {report['frames_judged']} of "
                  f"{report['frames_captured']} frames judged, {report['dropped']} dropped; trend "
                  f"{_num(report['latency_trend_ms_per_min'], '+.2f')} ms/min; "
                  f"process CPU {_num(report['process_cpu_percent'], '.0f')} %")
    table = Table(title="latency per window (ms, capture → verdict)")
    for name in ("from s", "frames", "FPS", "p50", "p99", "max"):
        table.add_column(name, justify="right")
    for w in report["windows"]:
        table.add_row(f"{w['start_s']:g}", str(w["frames"]), _num(w["fps"], ".1f"), f"{w['latency_p50_ms']:.1f}",
                      f"{w['latency_p99_ms']:.1f}", f"{w['latency_max_ms']:.1f}")
    console.print(table)


def print_multi_stream_report(report: dict[str, Any]) -> None:
    """The multi-stream camera-rate report: the totals, one row per stream, the latency per window."""
    from rich.table import Table

    console = _console()
    lat = report["latency_ms"]
    src = report["source"]
    console.print(f"[bold]camera rate[/] {report['streams_count']} streams of {src['frame_size'][1]}x"
                  f"{src['frame_size'][0]} at {src['fps']:g} fps, {report['mode']} mode, for {report['seconds']:.0f} s"
                  f" — {report['runtime']}")
    console.print(f"  total {_num(report['total_fps'], '.1f')} FPS, latency p50 {_num(lat['p50'], '.1f')} ms, "
                  f"p99 {_num(lat['p99'], '.1f')} ms, max {_num(lat['max'], '.1f')} ms; {report['frames_judged']} of "
                  f"{report['frames_captured']} frames judged, {report['dropped']} dropped; {report['batches']} "
                  f"batches of {_num(report['mean_batch'], '.2f')} frames (timeout {report['batch_timeout_ms']:g} ms);"
                  f" trend {_num(report['latency_trend_ms_per_min'], '+.2f')} ms/min; "
                  f"process CPU {_num(report['process_cpu_percent'], '.0f')} %; "
                  f"{'holds' if report['holds'] else 'does not hold'} {src['fps']:g} fps per stream")
    table = Table(title="per stream (latency capture → verdict, ms)")
    for name in ("stream", "captured", "judged", "dropped", "FPS", "p50", "p99"):
        table.add_column(name, justify="right")
    for i, st in enumerate(report["streams"]):
        table.add_row(str(i), str(st["frames_captured"]), str(st["frames_judged"]), str(st["dropped"]),
                      _num(st["fps"], ".1f"), _num(st["latency_p50_ms"], ".1f"), _num(st["latency_p99_ms"], ".1f"))
    console.print(table)


def print_stream_search(search: dict[str, Any]) -> None:
    """One row per trial of the search for the largest number of streams, and the answer."""
    from rich.table import Table

    console = _console()
    table = Table(title="streams that hold the camera rate (no drops, p99 < one frame period, ≥ 97 % of the rate)")
    for name in ("streams", "holds", "slowest FPS", "p99 ms", "dropped", "mean batch", "CPU %"):
        table.add_column(name, justify="right")
    for t in search["trials"]:
        slowest = min((s["fps"] for s in t["streams"] if s["fps"] is not None), default=None)
        table.add_row(str(t["streams_count"]), "yes" if t["holds"] else "no", _num(slowest, ".1f"),
                      _num(t["latency_ms"]["p99"], ".1f"), str(t["dropped"]), _num(t["mean_batch"], ".2f"),
                      _num(t["process_cpu_percent"], ".0f"))
    console.print(table)
    console.print(f"[bold]largest number of streams that holds:[/] {search['max_streams']}")


@cli_errors
def bench(
    engine_dirs: Annotated[list[Path], typer.Argument(help=(
        "Engine directories of one bundle (e.g. an FP32 and an INT8 ONNX Runtime build, a TensorRT build)."))],
    bundle: Annotated[Path | None, typer.Option(help=(
        "The defense bundle the engines were built from: adds the PyTorch-eager column (needs torch)."))] = None,
    batch: Annotated[str, typer.Option(help="Batch sizes (model inputs per call), comma-separated.")] = "1,8,32,128",
    mode: Annotated[Mode, typer.Option(help=(
        "resize: one model input per frame; tile: model-size tiles of each frame."))] = Mode.resize,
    frames: Annotated[int, typer.Option(help=(
        "Model inputs timed per chain and batch size (at least 10 calls each)."), min=1)] = 512,
    threads: Annotated[int | None, typer.Option(help=(
        "Intra-op threads of every chain and of the GEMM probe (default: the cores available)."), min=1)] = None,
    spinning: Annotated[bool | None, typer.Option("--spinning/--no-spinning", help=(
        "Whether ONNX Runtime's idle threads spin (default: off, measured faster for the chain)."))] = None,
    device: Annotated[str, typer.Option(help=(
        "Device of the PyTorch and ONNX Runtime chains: cpu, cuda or cuda:N "
        "(TensorRT always runs on the GPU)."))] = "cpu",
    tile_grid: Annotated[str | None, typer.Option(help=(
        "Tile mode: resize each frame to ROWSxCOLS tiles first (default: native resolution)."))] = None,
    frame_size: Annotated[str, typer.Option(help="Camera frame size WIDTHxHEIGHT.")] = "640x480",
    images: Annotated[Path | None, typer.Option(help=(
        "Folder of photographs the frames are made from (default: three shipped with ism-edge)."))] = None,
    camera_rate: Annotated[bool, typer.Option("--camera-rate", help=(
        "Instead: run the camera loop of 'ism-edge run' with the first ENGINE_DIR on a paced video (like a live "
        "camera) and report sustained FPS, latency and drops."))] = False,
    seconds: Annotated[float, typer.Option(help="--camera-rate: how long to run.", min=1.0)] = 120.0,
    fps: Annotated[float, typer.Option(help="--camera-rate: frame rate of the paced source.", min=0.1)] = 30.0,
    video: Annotated[Path | None, typer.Option(help=(
        "--camera-rate: video file to pace (default: a 10 s clip made from --images, looped)."))] = None,
    window: Annotated[float, typer.Option(help="--camera-rate: seconds per latency window.", min=0.1)] = 10.0,
    streams: Annotated[int, typer.Option(help=(
        "--camera-rate: paced sources judged together through the multi-stream loop of 'ism-edge run' "
        "(with --find-streams: the most tried)."), min=1)] = 1,
    find_streams: Annotated[bool, typer.Option("--find-streams", help=(
        "--camera-rate: search for the largest number of streams that holds --fps each (no drops, p99 under "
        "one frame period): doubling, then bisecting; each trial lasts --seconds."))] = False,
    batch_timeout: Annotated[float, typer.Option(help=(
        "--camera-rate with several streams: milliseconds a batch waits for the other streams."), min=0.0)] = 20.0,
    torch_compile: Annotated[bool, typer.Option("--torch-compile/--no-torch-compile", help=(
        "With --bundle: also the torch.compile (inductor) column; compiling takes a while per batch size."))] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON to this file.")] = None,
) -> None:
    """Measure the defense chain: throughput, latency and per-stage times side by side.

    On the same camera-like inputs, runs the full chain through PyTorch eager and torch.compile
    (with --bundle), ONNX Runtime FP32, ONNX Runtime INT8 (when such a directory is given) and
    TensorRT (when present), at each batch size; reports images/s, latency p50/p99, per-stage
    times, the ratios to PyTorch eager and to the fastest PyTorch column, and the share of the
    machine's GEMM peak (measured in the same process) that the chain reaches. With --camera-rate,
    runs the 'ism-edge run' loop on 30 fps videos paced like live cameras instead (--streams N of
    them through one engine chain).
    """
    from ism_edge._io import atomic_write_json
    from ism_edge.bench import BenchConfig, default_threads, engine_columns, load_engine_dirs
    from ism_edge.bench.frames import load_photos
    from ism_edge.runtime import max_threads

    size = parse_size(frame_size)
    grid = tile_grid_for(mode, tile_grid)
    if threads is not None and threads > max_threads():
        raise typer.BadParameter(
            f"--threads {threads} is more than the {max_threads()} threads this machine's cores can use")
    engines = load_engine_dirs(engine_dirs, bundle)
    n_threads = threads or default_threads()
    photos = load_photos(images)
    report: dict[str, Any]

    if (streams > 1 or find_streams) and not camera_rate:
        raise typer.BadParameter("--streams and --find-streams need --camera-rate")
    if camera_rate and (streams > 1 or find_streams):
        from ism_edge.bench.stream import find_max_streams, run_multi_stream_bench

        def trial(n: int) -> dict[str, Any]:
            return run_multi_stream_bench(engines[0][0], n, mode=mode.value, seconds=seconds, fps=fps,
                                          frame_size=size, video=video, threads=n_threads, spinning=spinning,
                                          tile_grid=grid, window_s=window, batch_timeout=batch_timeout / 1e3,
                                          photos=photos)  # fmt: skip

        if find_streams:
            limit = streams if streams > 1 else 64
            typer.echo(f"searching the largest number of streams (up to {limit}), {seconds:g} s each ...", err=True)
            report = find_max_streams(trial, fps, limit=limit, say=lambda m: typer.echo(m, err=True))
            print_stream_search(report)
        else:
            typer.echo(f"camera-rate run of {streams} streams through {engines[0][0]} for {seconds:g} s ...", err=True)
            report = trial(streams)
            print_multi_stream_report(report)
    elif camera_rate:
        from ism_edge.bench.stream import run_stream_bench

        first_dir = engines[0][0]
        typer.echo(f"camera-rate run of {first_dir} for {seconds:g} s ...", err=True)
        report = run_stream_bench(first_dir, mode=mode.value, seconds=seconds, fps=fps, frame_size=size, video=video,
                                  threads=n_threads, spinning=spinning, tile_grid=grid, window_s=window,
                                  photos=photos)  # fmt: skip
        print_stream_report(report)
    else:
        from ism_edge.bench.chain import run_chain_bench
        from ism_edge.bench.flops import chain_flops
        from ism_edge.bench.peak import gemm_peak

        try:
            config = BenchConfig(batches=parse_batches(batch), mode=mode.value, frames=frames, threads=n_threads,
                                 tile_grid=grid, frame_size=size)  # fmt: skip
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        columns = [_eager_column(bundle, n_threads, device, engines[0][1].thresholds),
                   _compiled_column(bundle, n_threads, device, engines[0][1].thresholds, torch_compile),
                   *engine_columns(engines, threads=n_threads, device=device, spinning=spinning)]
        typer.echo(f"GEMM probe ({n_threads} threads) ...", err=True)
        peak = gemm_peak(n_threads)
        flops = _chain_flops_or_note(chain_flops, engines[0][0])
        report = run_chain_bench(columns, engines[0][1], config, flops=flops, peak=peak,
                                 photos=photos, progress=lambda m: typer.echo(m, err=True),
                                 extra={"engine_dirs": [str(d) for d, _ in engines],
                                        "bundle": None if bundle is None else str(bundle),
                                        "spinning": spinning})  # fmt: skip
        print_chain_report(report)
    if json_out is not None:
        atomic_write_json(json_out, json.loads(json.dumps(report, default=str)))
        typer.echo(f"report written to {json_out}", err=True)


def _chain_flops_or_note(count: Any, engine_dir: Path) -> Any:
    """The chain's FLOPs, or None with a note when ``onnx`` is missing (a runtime-only install): the
    ONNX Runtime columns run without it, only the GFLOP/s and % peak columns stay empty."""
    from ism_edge.errors import MissingDependencyError

    try:
        return count(engine_dir)
    except MissingDependencyError as e:
        typer.echo(f"note: no FLOPs, GFLOP/s or share of the peak: {e}", err=True)
        return None


def _eager_column(bundle: Path | None, threads: int, device: str, thresholds: dict[str, float]) -> Any:
    """The PyTorch-eager column, or the reason it does not run (no bundle, no torch); it flags with
    ``thresholds`` (the first engine directory's, which ``ism-edge calibrate`` may have changed)."""
    from ism_edge.bench import EAGER, Column

    title = "PyTorch eager"
    if bundle is None:
        return Column(EAGER, title, reason="no --bundle given (the bundle the engines were built from)")
    try:
        import torch  # noqa: F401
    except ImportError:
        return Column(EAGER, title, reason="not available here: torch is not installed (pip install 'ism-edge[train]')")

    def factory() -> Any:
        from ism_edge_engines.bench_torch import TorchEagerChain

        return TorchEagerChain(bundle, threads=threads, device=device, thresholds=thresholds)

    return Column(EAGER, title, factory)


def _compiled_column(bundle: Path | None, threads: int, device: str, thresholds: dict[str, float],
                     wanted: bool) -> Any:
    """The torch.compile column (the fastest thing a PyTorch user would deploy), or why it does not run."""
    from ism_edge.bench import COMPILED, Column

    title = "torch.compile"
    if not wanted:
        return Column(COMPILED, title, reason="not run: --no-torch-compile")
    if bundle is None:
        return Column(COMPILED, title, reason="no --bundle given (the bundle the engines were built from)")
    try:
        import torch  # noqa: F401
    except ImportError:
        return Column(COMPILED, title,
                      reason="not available here: torch is not installed (pip install 'ism-edge[train]')")
    from ism_edge_engines.bench_torch import cxx_compiler

    if device.startswith("cpu") and cxx_compiler() is None:
        return Column(COMPILED, title,
                      reason="not available here: inductor needs a C++ compiler on PATH (g++, clang++)")

    def factory() -> Any:
        from ism_edge_engines.bench_torch import TorchCompiledChain

        return TorchCompiledChain(bundle, threads=threads, device=device, thresholds=thresholds)

    return Column(COMPILED, title, factory)
