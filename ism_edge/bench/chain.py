"""Side-by-side chain benchmark: the same inputs through every implementation of the defense.

Every *column* is one implementation of the whole chain (docs/architecture.md, "The defense
chain") on a batch of model inputs:
M (with the manifest's feedback rounds), C on x and on x̂, P on (x, x̂), then the host-side
decisions (JSD, thresholds, labels). Columns: PyTorch eager from the bundle (supplied by the
caller, see ``engines/bench_torch.py``: this package never imports torch), ONNX Runtime FP32,
ONNX Runtime INT8 and TensorRT FP16 through :class:`~ism_edge.runtime.DefenseRuntime`'s backend.

Inputs are camera-like 640×480 frames (:mod:`ism_edge.bench.frames`) turned into model inputs
by :mod:`ism_edge.preprocess` in resize or tile mode. Preprocessing is the same numpy/OpenCV
code for every column, so it is measured once, on the same frames, and charged to each call as
``batch × (median preprocessing time per model input)``; everything else is measured per call.

For each column and batch size: images (model inputs) per second, latency p50/p99 of one call
(preprocessing share + chain), mean per-stage times, the ratio of throughput to PyTorch eager
and to the fastest PyTorch peer (eager or ``torch.compile``, whose compile time is reported
apart) at the same batch, and the FLOP rate as a share of the machine's measured GEMM peak
(:mod:`ism_edge.bench.peak`, FLOPs from :mod:`ism_edge.bench.flops`). The columns' labels and
flags are also compared on the same inputs (agreement), so a fast column that decides
differently is visible.
"""

from __future__ import annotations

import datetime as _dt
import gc
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ism_edge import preprocess
from ism_edge.backends import STAGES, ChainOutput
from ism_edge.bench.flops import ChainFlops
from ism_edge.bench.frames import DEFAULT_FRAME_SIZE, camera_frames
from ism_edge.bench.peak import Peak
from ism_edge.decision import decide
from ism_edge.manifest import EngineManifest
from ism_edge.runtime import DefenseRuntime

SCHEMA = "ism-edge-bench/2"  # 2: preprocess_ms_per_input by batch size
BENCH_STAGES = ("preprocess", *STAGES)
DEFAULT_BATCHES = (1, 8, 32, 128)
EAGER = "pytorch-eager"
COMPILED = "pytorch-compile"
PEERS = (EAGER, COMPILED)  # what a PyTorch user would run instead: the ratio that counts is to the fastest


def default_threads() -> int:
    """The CPU cores this process may run on (what the chain and the GEMM probe use)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class BenchConfig:
    """What :func:`run_chain_bench` measures.

    ``batches``: model inputs per chain call. ``mode``: ``resize`` (one input per frame) or
    ``tile`` (model-size tiles of each frame, at native resolution or ``tile_grid``).
    ``frames``: model inputs timed per column and batch size (at least ``min_calls`` calls).
    ``threads``: intra-op threads of every column and of the GEMM probe. ``frame_size``:
    (height, width) of the camera frames. ``warmup``: untimed calls per column and batch.
    """

    batches: tuple[int, ...] = DEFAULT_BATCHES
    mode: str = "resize"
    frames: int = 512
    threads: int = field(default_factory=default_threads)
    tile_grid: tuple[int, int] | None = None
    frame_size: tuple[int, int] = DEFAULT_FRAME_SIZE
    warmup: int = 3
    min_calls: int = 10

    def __post_init__(self) -> None:
        if not self.batches or any(b < 1 for b in self.batches):
            raise ValueError(f"batch sizes must be >= 1, got {self.batches}")
        if self.mode not in preprocess.MODES:
            raise ValueError(f"mode must be one of {', '.join(preprocess.MODES)}, got {self.mode!r}")
        if self.frames < 1 or self.min_calls < 1 or self.warmup < 0:
            raise ValueError("frames and min_calls must be >= 1 and warmup >= 0")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.tile_grid is not None and (self.mode != "tile" or min(self.tile_grid) < 1):
            raise ValueError("tile_grid needs mode 'tile' and rows, cols >= 1")
        if min(self.frame_size) < 1:
            raise ValueError(f"frame_size must be positive, got {self.frame_size}")


@dataclass
class ChainResult:
    """One call of a chain: per-stage milliseconds (a subset of :data:`STAGES`), and the
    per-input labels and flags it decided."""

    stages_ms: dict[str, float]
    labels: np.ndarray
    flags: np.ndarray


class Chain(Protocol):
    """One implementation of the whole chain, ready to run (a benchmark column)."""

    def describe(self) -> str: ...

    def run(self, x: np.ndarray) -> ChainResult: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Column:
    """A benchmark column: ``name`` (JSON key), ``title`` (table), and either a ``factory``
    that builds its chain or the ``reason`` it cannot run here."""

    name: str
    title: str
    factory: Callable[[], Chain] | None = None
    reason: str | None = None


class RuntimeChain:
    """The chain of an engine directory on one of the runtime's backends (ONNX Runtime, TensorRT).

    Batches larger than the engines' maximum run as several backend jobs, as
    :meth:`DefenseRuntime.process_batch` does.
    """

    def __init__(self, engine_dir: str | Path, *, backend: str, threads: int | None, device: str = "auto",
                 spinning: bool | None = None) -> None:
        self.runtime = DefenseRuntime(engine_dir, backend=backend, threads=threads, device=device, spinning=spinning)

    def describe(self) -> str:
        return self.runtime.describe()

    def run(self, x: np.ndarray) -> ChainResult:
        backend = self.runtime.backend
        step = backend.max_batch
        parts = [backend.infer(x[lo : lo + step]) for lo in range(0, len(x), step)]
        out = ChainOutput.concatenate(parts)
        t0 = time.perf_counter()
        decided = decide(out, self.runtime.manifest)
        host_ms = (time.perf_counter() - t0) * 1e3
        stages = {s: float(out.timings_ms.get(s, 0.0)) for s in STAGES}
        stages["detectors"] += host_ms
        return ChainResult(stages, decided.labels, decided.flags)

    def close(self) -> None:
        self.runtime.close()


def runtime_column(name: str, title: str, engine_dir: str | Path, *, backend: str, threads: int | None,
                   device: str = "auto", spinning: bool | None = None) -> Column:
    """A column for an engine directory on ``backend`` (built when the benchmark reaches it)."""
    return Column(name, title,
                  lambda: RuntimeChain(engine_dir, backend=backend, threads=threads, device=device, spinning=spinning))


# -- inputs ----------------------------------------------------------------------------------------


@dataclass
class InputPool:
    """Model inputs made from camera frames, and what making them cost.

    ``x``: float32 ``[P, C, H, W]``; ``preprocess_ms``: median milliseconds of preprocessing per
    model input, by batch size (see :func:`input_pool`); ``tiles_per_frame``: model inputs per frame.
    """

    x: np.ndarray
    preprocess_ms: dict[int, float]
    tiles_per_frame: int
    frames: int


def input_pool(size: int, input_shape: tuple[int, int, int], manifest: EngineManifest, config: BenchConfig,
               photos: list[np.ndarray] | None = None, *, repeats: int = 7) -> InputPool:
    """At least ``size`` model inputs from :func:`camera_frames`, preprocessed as the runtime does
    (``check_frame``, then :class:`~ism_edge.preprocess.FramePreparer` with ``config.threads``
    workers into a reused buffer), and the cost of it at each batch size: the median over
    ``repeats`` calls (more when needed to time 256 frames) that prepare the frames of one batch
    (``batch / tiles per frame`` of them, at least one; consecutive calls take different frames), per
    model input. One call is warmed up first."""
    preparer = preprocess.FramePreparer(input_shape, mode=config.mode, tile_grid=config.tile_grid,
                                        color_order="BGR", model_order=manifest.color_order, workers=config.threads)
    per_frame = preparer.count(np.empty((*config.frame_size, 3), dtype=np.uint8))
    n_frames = max(8, math.ceil(size / per_frame))
    per_call = {b: min(n_frames, max(1, round(b / per_frame))) for b in config.batches}
    kept = min(n_frames, max(16, *per_call.values()))  # frames kept for timing (a rotation of them)
    x = np.empty((n_frames * per_frame, *input_shape), dtype=np.float32)
    frames: list[np.ndarray] = []
    try:
        for i, frame in enumerate(camera_frames(n_frames, config.frame_size, photos)):
            preparer.prepare([preprocess.check_frame(frame)], x[i * per_frame : (i + 1) * per_frame])
            if i < kept:
                frames.append(frame)
        scratch = np.zeros((kept * per_frame, *input_shape), dtype=np.float32)

        def timed(n: int, call: int) -> float:
            lo = (call * n) % (kept - n + 1)  # a camera's frames are new ones: rotate, do not re-read one from cache
            t0 = time.perf_counter()
            preparer.prepare([preprocess.check_frame(f) for f in frames[lo : lo + n]], scratch[: n * per_frame])
            return (time.perf_counter() - t0) * 1e3

        costs: dict[int, float] = {}
        for batch, n in sorted(per_call.items()):
            timed(n, 0)
            calls = max(repeats, math.ceil(256 / n))  # at least 256 frames timed
            costs[batch] = float(np.median([timed(n, k) for k in range(calls)])) / (n * per_frame)
    finally:
        preparer.close()
    return InputPool(x, costs, per_frame, n_frames)


# -- measuring ---------------------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def measure(chain: Chain, pool: InputPool, batch: int, config: BenchConfig) -> dict[str, Any]:
    """Time ``chain`` at ``batch`` on consecutive slices of the pool (see the module doc)."""
    if batch > len(pool.x):
        raise ValueError(f"batch {batch} is larger than the input pool ({len(pool.x)} inputs)")
    calls = max(config.min_calls, math.ceil(config.frames / batch))
    span = len(pool.x) - batch + 1

    def inputs(k: int) -> np.ndarray:
        lo = (k * batch) % span
        return pool.x[lo : lo + batch]

    for k in range(config.warmup):
        chain.run(inputs(k))
    pre = pool.preprocess_ms[batch] * batch
    latencies: list[float] = []
    stage_sums = dict.fromkeys(BENCH_STAGES, 0.0)
    for k in range(calls):
        x = inputs(k)
        t0 = time.perf_counter()
        result = chain.run(x)
        wall = (time.perf_counter() - t0) * 1e3
        latencies.append(wall + pre)
        for s in STAGES:
            stage_sums[s] += result.stages_ms.get(s, 0.0)
    stage_sums["preprocess"] = pre * calls
    seconds = sum(latencies) / 1e3
    mean_ms = {s: v / calls for s, v in stage_sums.items()}
    mean_ms["other"] = max(0.0, sum(latencies) / calls - sum(mean_ms.values()))
    images_per_s = batch * calls / seconds
    return {
        "batch": batch,
        "calls": calls,
        "images_per_s": images_per_s,
        "frames_per_s": images_per_s / pool.tiles_per_frame,
        "latency_ms": {
            "p50": _percentile(latencies, 50), "p99": _percentile(latencies, 99), "mean": sum(latencies) / calls
        },
        "stages_ms": mean_ms,
    }


def _decisions(chain: Chain, x: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    labels, flags = [], []
    for lo in range(0, len(x), batch):
        r = chain.run(x[lo : lo + batch])
        labels.append(np.asarray(r.labels).reshape(-1))
        flags.append(np.asarray(r.flags).reshape(-1))
    return np.concatenate(labels), np.concatenate(flags)


# -- the report ---------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, cores, the thread count used, and the INT8 dot-product extensions present."""
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu": model,
        "cores_available": default_threads(),
        "threads": threads,
        "int8_dot_product": sorted(flags & {"avx512_vnni", "avx_vnni", "asimddp", "amx_int8"}),
        "platform": platform.platform(),
    }


def _versions() -> dict[str, str]:
    import ism_edge

    v = {"ism_edge": ism_edge.__version__, "numpy": np.__version__, "python": platform.python_version()}
    try:
        import onnxruntime

        v["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return v


def prep_text(costs: dict[int, float] | dict[str, float]) -> str:
    """``0.175 ms per input at batch 1, 0.097 at 32, …`` (for the log and the table's caption)."""
    parts = [f"{ms:.3f} ms per input at batch {b}" if k == 0 else f"{ms:.3f} at {b}"
             for k, (b, ms) in enumerate(sorted(costs.items(), key=lambda kv: int(kv[0])))]
    return ", ".join(parts)


def run_chain_bench(
    columns: Sequence[Column],
    manifest: EngineManifest,
    config: BenchConfig,
    *,
    flops: ChainFlops | None = None,
    peak: Peak | None = None,
    photos: list[np.ndarray] | None = None,
    progress: Callable[[str], None] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every column on the same inputs and return the report (JSON-ready dict).

    Columns run one after the other; each is built, warmed up, timed at every batch size,
    checked for agreement with the reference (PyTorch eager when it runs, else the first column
    that runs) and closed before the next starts, so they never compete for the cores.
    """
    say = progress or (lambda _m: None)
    input_shape = tuple(manifest.input_shape)
    pool = input_pool(2 * max(config.batches), input_shape, manifest, config, photos)  # type: ignore[arg-type]
    check = pool.x[: min(len(pool.x), 256)]
    say(f"inputs: {len(pool.x)} model inputs from {pool.frames} frames of "
        f"{config.frame_size[1]}x{config.frame_size[0]} ({config.mode} mode, {pool.tiles_per_frame} per frame); "
        f"preprocessing {prep_text(pool.preprocess_ms)}")
    reports: list[dict[str, Any]] = []
    decisions: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for column in columns:
        entry: dict[str, Any] = {"name": column.name, "title": column.title}
        reports.append(entry)
        if column.factory is None:
            entry.update(status="not run", reason=column.reason, results=[])
            say(f"{column.title}: not run ({column.reason})")
            continue
        say(f"{column.title}: loading")
        chain = column.factory()
        try:
            entry.update(status="ok", reason=None, describe=chain.describe(), results=[])
            for batch in config.batches:
                say(f"{column.title}: batch {batch}")
                entry["results"].append(measure(chain, pool, batch, config))
                compiled = getattr(chain, "compile_seconds", None)  # torch.compile: its first call, in the warm-up
                if isinstance(compiled, dict) and batch in compiled:
                    entry["results"][-1]["compile_s"] = float(compiled[batch])
            decisions[column.name] = _decisions(chain, check, min(max(config.batches), 64))
        finally:
            chain.close()
            del chain
            gc.collect()
            time.sleep(0.5)  # let the previous column's worker threads go idle

    reference = EAGER if EAGER in decisions else next(iter(decisions), None)
    peak_flops = None if peak is None else peak.flops_per_s
    eager = next((r for r in reports if r["name"] == EAGER and r["status"] == "ok"), None)
    eager_rate = {res["batch"]: res["images_per_s"] for res in eager["results"]} if eager else {}
    fastest_peer: dict[int, tuple[float, str]] = {}
    for entry in reports:
        if entry["name"] in PEERS and entry["status"] == "ok":
            for res in entry["results"]:
                if res["images_per_s"] > fastest_peer.get(res["batch"], (0.0, ""))[0]:
                    fastest_peer[res["batch"]] = (res["images_per_s"], entry["name"])
    best: dict[str, Any] | None = None
    for entry in reports:
        for res in entry["results"]:
            base = eager_rate.get(res["batch"])
            res["vs_eager"] = None if base is None else res["images_per_s"] / base
            peer = fastest_peer.get(res["batch"])
            res["vs_fastest_peer"] = None if peer is None else res["images_per_s"] / peer[0]
            res["fastest_peer"] = None if peer is None else peer[1]
            achieved = None if flops is None else flops.per_input * res["images_per_s"]
            res["gflops"] = None if achieved is None else achieved / 1e9
            res["peak_share"] = None if achieved is None or not peak_flops else achieved / peak_flops
            if res["peak_share"] is not None and (best is None or res["peak_share"] > best["peak_share"]):
                best = {"column": entry["name"], "batch": res["batch"], "peak_share": res["peak_share"],
                        "gflops": res["gflops"]}
        if entry["name"] in decisions and reference is not None:
            ref_labels, ref_flags = decisions[reference]
            labels, flags = decisions[entry["name"]]
            entry["agreement"] = {
                "against": reference,
                "inputs": int(len(labels)),
                "labels": float(np.mean(labels == ref_labels)),
                "flags": float(np.mean(flags == ref_flags)),
            }
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(config.threads),
        "versions": _versions(),
        "config": {
            "mode": config.mode,
            "batches": list(config.batches),
            "frames": config.frames,
            "threads": config.threads,
            "frame_size": list(config.frame_size),
            "tile_grid": None if config.tile_grid is None else list(config.tile_grid),
            "warmup": config.warmup,
            "min_calls": config.min_calls,
        },
        "input_shape": list(input_shape),
        "feedback_rounds": manifest.feedback_rounds,
        "inputs": {"pool": int(len(pool.x)), "frames": pool.frames, "tiles_per_frame": pool.tiles_per_frame,
                   "preprocess_ms_per_input": {str(b): ms for b, ms in pool.preprocess_ms.items()}},
        "flops": None if flops is None else flops.to_json(),
        "peak": None if peak is None else peak.to_json(),
        "columns": reports,
        "best_peak_share": best,
        **(extra or {}),
    }
