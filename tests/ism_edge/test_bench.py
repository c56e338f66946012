"""`ism_edge.bench`: FLOP counting, the GEMM probe, the report's structure, the camera-rate loop,
and the fast path it measures (preprocessing into buffers, the live loop answering at once).

No test asserts a speed: the figures are measured by ``ism-edge bench`` and kept in
docs/performance.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ism_edge import DefenseRuntime, preprocess
from ism_edge.bench import Column, engine_columns, load_engine_dirs, runtime_column
from ism_edge.bench.chain import BENCH_STAGES, BenchConfig, run_chain_bench
from ism_edge.bench.flops import CHAIN_MULTIPLICITY, ChainFlops, chain_flops, graph_macs
from ism_edge.bench.frames import camera_frames, load_photos, write_video
from ism_edge.bench.peak import PeakProbe, gemm_peak
from ism_edge.bench.stream import (
    find_max_streams,
    latency_trend,
    latency_windows,
    run_multi_stream_bench,
    run_stream_bench,
)
from ism_edge.camera_loop import run_camera_loop
from ism_edge.errors import EngineError
from ism_edge.outputs import VerdictLog
from ism_edge.sources import FrameReader, ReaderOptions
from tests.conftest import ROOT
from tests.ism_edge.conftest import ScriptedSource

onnx = pytest.importorskip("onnx")

# -- FLOPs -------------------------------------------------------------------------------------------


def _graph(path: Path) -> Path:
    """A graph with one node of every counted kind, batch axis N, and a known MAC count."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.random((8, 3, 3, 3), dtype=np.float32), "w_conv"),  # 3→8, 3×3, stride 1, pad 1
        numpy_helper.from_array(rng.random((8, 4, 2, 2), dtype=np.float32), "w_tconv"),  # 8→4, 2×2, stride 2
        numpy_helper.from_array(rng.random((4 * 32 * 32, 10), dtype=np.float32), "w_gemm"),
        numpy_helper.from_array(rng.random((10, 6), dtype=np.float32), "w_mm"),
        numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w_conv"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["c", "w_tconv"], ["t"], strides=[2, 2]),
        helper.make_node("Reshape", ["t", "flat"], ["f"]),
        helper.make_node("Gemm", ["f", "w_gemm"], ["g"]),
        helper.make_node("MatMul", ["g", "w_mm"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_graph_macs_follow_the_stated_formulas(tmp_path: Path) -> None:
    path = _graph(tmp_path / "g.onnx")
    expected = {
        "Conv": (8 * 16 * 16) * (3 * 3 * 3),  # |output| · C_in · k_h · k_w
        "ConvTranspose": (8 * 16 * 16) * (4 * 2 * 2),  # |input| · C_out · k_h · k_w
        "Gemm": 10 * 4096,  # |output| · K
        "MatMul": 6 * 10,
    }
    assert graph_macs(path) == expected
    assert graph_macs(path, batch=3) == {k: 3 * v for k, v in expected.items()}


def test_chain_flops_of_an_engine_directory(engine_dir: Path) -> None:
    flops = chain_flops(engine_dir)
    assert set(flops.graphs) == {"mapper", "classifier", "perturbation"}
    assert all(g.flops == 2 * g.macs > 0 for g in flops.graphs.values())
    assert flops.per_input == sum(CHAIN_MULTIPLICITY[r] * g.flops for r, g in flops.graphs.items())
    assert flops.per_input == (flops.graphs["mapper"].flops + 2 * flops.graphs["classifier"].flops
                               + flops.graphs["perturbation"].flops)
    # the mapper's first convolution alone (small preset: 3→16, 7×7, stride 2 on 32×32) is counted
    assert flops.graphs["mapper"].macs_by_op["Conv"] >= 16 * 16 * 16 * 3 * 7 * 7
    assert json.loads(json.dumps(flops.to_json()))["per_input"] == flops.per_input


def test_a_corrupt_graph_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(EngineError, match="bad.onnx"):
        graph_macs(bad)


# -- GEMM probe ----------------------------------------------------------------------------------------


def test_gemm_peak_runs_both_probes_and_keeps_the_best() -> None:
    peak = gemm_peak(threads=1, size=64, repeats=2)
    names = {p.name for p in peak.probes}
    assert names == {"numpy matmul", "onnxruntime MatMul"} and not peak.skipped
    assert peak.flops_per_s == max(p.flops_per_s for p in peak.probes) > 0
    probe = PeakProbe("x", size=10, threads=1, repeats=1, best_s=0.5)
    assert probe.flops_per_s == 2 * 10**3 / 0.5
    assert json.loads(json.dumps(peak.to_json()))["gflops"] > 0


# -- chain report --------------------------------------------------------------------------------------


SMALL = BenchConfig(batches=(1, 3, 70), frames=6, threads=1, frame_size=(96, 128), warmup=1, min_calls=2)


@pytest.fixture(scope="module")
def report(engine_dir: Path) -> dict:
    engines = load_engine_dirs([engine_dir])
    columns = [
        Column("pytorch-eager", "PyTorch eager", reason="no --bundle given"),
        runtime_column("onnxruntime-fp32", "ONNX Runtime FP32", engine_dir, backend="onnxruntime", threads=1,
                       device="cpu"),
        runtime_column("again", "ONNX Runtime FP32 again", engine_dir, backend="onnxruntime", threads=1, device="cpu"),
    ]
    peak = gemm_peak(threads=1, size=64, repeats=2)
    return run_chain_bench(columns, engines[0][1], SMALL, flops=chain_flops(engine_dir), peak=peak)


def test_report_structure(report: dict) -> None:
    assert report["schema"] == "ism-edge-bench/2"
    assert json.loads(json.dumps(report)) == report  # plain JSON
    assert report["config"]["batches"] == [1, 3, 70] and report["machine"]["threads"] == 1
    prep = report["inputs"]["preprocess_ms_per_input"]
    assert report["inputs"]["tiles_per_frame"] == 1 and set(prep) == {"1", "3", "70"} and min(prep.values()) > 0
    names = [c["name"] for c in report["columns"]]
    assert names == ["pytorch-eager", "onnxruntime-fp32", "again"]
    skipped, ran = report["columns"][0], report["columns"][1:]
    assert skipped["status"] == "not run" and skipped["results"] == [] and "bundle" in skipped["reason"]
    for col in ran:
        assert col["status"] == "ok" and "onnxruntime" in col["describe"]
        assert [r["batch"] for r in col["results"]] == [1, 3, 70]  # 70 > the engines' max batch 64: two jobs
        for r in col["results"]:
            assert r["calls"] >= SMALL.min_calls and r["calls"] * r["batch"] >= SMALL.frames
            assert set(r["stages_ms"]) == {*BENCH_STAGES, "other"}
            assert r["images_per_s"] > 0 and r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
            assert r["vs_eager"] is None  # no eager column ran
            assert r["gflops"] == pytest.approx(report["flops"]["per_input"] * r["images_per_s"] / 1e9)
            assert r["peak_share"] == pytest.approx(r["gflops"] * 1e9 / (report["peak"]["gflops"] * 1e9), rel=1e-3)
    # without PyTorch the first column that ran is the reference; the same engines agree fully
    assert ran[1]["agreement"] == {"against": "onnxruntime-fp32", "inputs": 140, "labels": 1.0, "flags": 1.0}
    best = report["best_peak_share"]
    assert best["peak_share"] == max(r["peak_share"] for c in ran for r in c["results"])


def test_ratios_are_against_the_eager_column(engine_dir: Path) -> None:
    """A column named pytorch-eager is the reference of ratios and agreement."""
    engines = load_engine_dirs([engine_dir])
    cfg = BenchConfig(batches=(2,), frames=2, threads=1, frame_size=(64, 64), warmup=0, min_calls=2)
    cols = [runtime_column(n, n, engine_dir, backend="onnxruntime", threads=1, device="cpu")
            for n in ("fast", "pytorch-eager")]
    rep = run_chain_bench(cols, engines[0][1], cfg)
    fast, eager = rep["columns"]
    assert eager["results"][0]["vs_eager"] == 1.0
    assert fast["results"][0]["vs_eager"] == pytest.approx(fast["results"][0]["images_per_s"]
                                                           / eager["results"][0]["images_per_s"])
    assert fast["agreement"]["against"] == "pytorch-eager"
    assert rep["flops"] is None and rep["peak"] is None and fast["results"][0]["peak_share"] is None


def test_tile_mode_counts_tiles_as_inputs(engine_dir: Path) -> None:
    engines = load_engine_dirs([engine_dir])
    cfg = BenchConfig(batches=(4,), mode="tile", tile_grid=(2, 3), frames=4, threads=1, frame_size=(96, 128), warmup=0,
                      min_calls=2)
    rep = run_chain_bench([runtime_column("ort", "ORT", engine_dir, backend="onnxruntime", threads=1, device="cpu")],
                          engines[0][1], cfg)
    assert rep["inputs"]["tiles_per_frame"] == 6
    r = rep["columns"][0]["results"][0]
    assert r["frames_per_s"] == pytest.approx(r["images_per_s"] / 6)


def test_columns_for_the_engine_directories(engine_dir: Path, engine_copy: Path) -> None:
    cols = engine_columns(load_engine_dirs([engine_dir]), threads=1)
    by_name = {c.name: c for c in cols}
    assert list(by_name) == ["onnxruntime-fp32", "onnxruntime-int8", "tensorrt"]
    assert by_name["onnxruntime-fp32"].factory is not None
    assert by_name["onnxruntime-int8"].factory is None
    assert "--precision int8" in (by_name["onnxruntime-int8"].reason or "")
    tensorrt = pytest.importorskip("tensorrt")
    if not hasattr(tensorrt, "Builder"):
        assert by_name["tensorrt"].factory is None
        assert (by_name["tensorrt"].reason or "").startswith("not available here")


def test_engine_directories_of_other_bundles_are_refused(engine_dir: Path, engine_copy: Path,
                                                         untrained_bundle_dir: Path, tmp_path: Path) -> None:
    raw = json.loads((engine_copy / "manifest.json").read_text())
    raw["bundle_sha256"] = "0" * 64
    (engine_copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EngineError, match="different bundles"):
        load_engine_dirs([engine_dir, engine_copy])
    assert load_engine_dirs([engine_dir], untrained_bundle_dir)[0][0] == engine_dir
    with pytest.raises(EngineError, match="is not the one"):
        load_engine_dirs([engine_copy], untrained_bundle_dir)


def test_bench_config_is_validated() -> None:
    for bad in (dict(batches=()), dict(batches=(0,)), dict(mode="crop"), dict(threads=0), dict(tile_grid=(2, 2))):
        with pytest.raises(ValueError):
            BenchConfig(**bad)  # type: ignore[arg-type]


def test_camera_frames_are_deterministic_and_sized() -> None:
    photos = load_photos()
    a = list(camera_frames(35, (48, 64), photos))
    b = list(camera_frames(35, (48, 64), photos))
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[29], a[30])  # panning, then the next photo


# -- the fast path the benchmark measures ---------------------------------------------------------------


@pytest.mark.parametrize("size", [(480, 640), (70, 100), (33, 100), (10, 20), (32, 32)])
@pytest.mark.parametrize("grid", [None, (3, 4)])
def test_tiles_written_into_a_buffer_equal_plain_crops(size: tuple[int, int], grid: tuple[int, int] | None) -> None:
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    n = preprocess.tile_count(size, (3, 32, 32), grid)
    out = np.full((n, 3, 32, 32), -1.0, np.float32)
    tiles, layout = preprocess.tile_input(frame, (3, 32, 32), grid=grid, out=out, color_order="BGR", model_order="RGB")
    assert tiles is out and len(layout.boxes) == n == layout.rows * layout.cols
    image = frame if layout.tiled_size == size else preprocess._resize(frame, *layout.tiled_size)
    ys, xs = preprocess.tile_positions(layout.tiled_size[0], 32), preprocess.tile_positions(layout.tiled_size[1], 32)
    crops = [image[y : y + 32, x : x + 32, ::-1] for y in ys for x in xs]  # BGR → RGB
    expected = np.stack(crops).astype(np.float32).transpose(0, 3, 1, 2) * np.float32(1 / 255)
    assert np.array_equal(out, expected)


def test_resize_into_a_buffer_equals_the_allocating_call(photos: list[np.ndarray]) -> None:
    buf = np.zeros((3, 3, 32, 32), np.float32)
    for i, frame in enumerate(photos[:3]):
        preprocess.resize_input(frame, (3, 32, 32), out=buf[i : i + 1])
        assert np.array_equal(buf[i : i + 1], preprocess.resize_input(frame, (3, 32, 32)))
    with pytest.raises(ValueError, match="out must be"):
        preprocess.resize_input(photos[0], (3, 32, 32), out=np.zeros((1, 3, 16, 16), np.float32))


def test_runtime_reuses_its_input_buffer_and_verdicts_do_not_change(engine_dir: Path, photos: list[np.ndarray]) -> None:
    with DefenseRuntime(engine_dir) as rt:
        first = [v.to_json() for v in rt.process_batch(photos)]
        buffer = rt._buffers.inputs
        again = ([v.to_json() for v in rt.process_batch(photos[:2])]
                 + [v.to_json() for v in rt.process_batch(photos[2:])])
        assert rt._buffers.inputs is buffer  # no new allocation for the same or smaller batches
    strip = [{k: v for k, v in j.items() if k != "timings_ms"} for j in first]
    assert strip == [{k: v for k, v in j.items() if k != "timings_ms"} for j in again]


@pytest.mark.parametrize("spinning", [False, True])
def test_spinning_is_a_session_option_and_leaves_verdicts_alone(engine_dir: Path, photos: list[np.ndarray],
                                                                spinning: bool) -> None:
    with (DefenseRuntime(engine_dir, threads=2) as default,
          DefenseRuntime(engine_dir, threads=2, spinning=spinning) as tuned):
        for session in tuned.backend._sessions.values():  # type: ignore[attr-defined]
            options = session.get_session_options()
            assert options.get_session_config_entry("session.intra_op.allow_spinning") == str(int(spinning))
        for session in default.backend._sessions.values():  # type: ignore[attr-defined]
            assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
        a = [v.to_json() for v in default.process_batch(photos)]
        b = [v.to_json() for v in tuned.process_batch(photos)]
    assert [dict(j, timings_ms=None) for j in a] == [dict(j, timings_ms=None) for j in b]


def test_a_live_frame_is_answered_before_the_next_capture(engine_dir: Path, tmp_path: Path) -> None:
    """With no next frame waiting, the loop finishes the frame in flight instead of holding it."""
    source = ScriptedSource([np.zeros((40, 60, 3), np.uint8), "block"], live=True)
    log = tmp_path / "v.jsonl"
    stop = threading.Event()
    with DefenseRuntime(engine_dir) as rt:
        worker = threading.Thread(target=run_camera_loop,
                                  args=(rt, FrameReader(source, ReaderOptions(stall_timeout=30))),
                                  kwargs={"log": VerdictLog(log), "stop": stop})  # fmt: skip
        worker.start()
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (log.is_file() and log.read_text().count("\n") >= 1):
                time.sleep(0.02)
            answered_while_blocked = not source.release.is_set() and log.read_text().count("\n") == 1
        finally:
            stop.set()
            source.release.set()
            worker.join(10)
    assert answered_while_blocked


# -- camera rate -------------------------------------------------------------------------------------------


def test_latency_windows_and_trend() -> None:
    flat = [(i / 30, 5.0) for i in range(300)]  # 10 s at 30 fps, constant latency
    windows = latency_windows(flat, 2.0)
    assert [w["start_s"] for w in windows] == [0, 2, 4, 6, 8] and all(w["frames"] == 60 for w in windows)
    assert all(w["fps"] == pytest.approx(30.0) and w["latency_p99_ms"] == 5.0 for w in windows)
    assert latency_trend(flat) == pytest.approx(0.0, abs=1e-9)
    growing = [(t, 5.0 + 2.0 * t) for t, _ in flat]  # +2 ms per second of capture time
    assert latency_trend(growing) == pytest.approx(120.0)
    assert latency_windows([], 1.0) == [] and latency_trend(flat[:2]) is None
    assert len(latency_windows(flat[:10], 2.0)) == 1  # shorter than one window: one window


def test_stream_bench_report(engine_dir: Path) -> None:
    rep = run_stream_bench(engine_dir, seconds=2.0, fps=15.0, frame_size=(60, 80), threads=1, window_s=1.0)
    assert rep["frames_judged"] >= 1 and rep["frames_captured"] >= rep["frames_judged"]
    assert rep["dropped"] >= 0 and rep["sustained_fps"] > 0
    assert rep["latency_ms"]["p50"] <= rep["latency_ms"]["p99"] <= rep["latency_ms"]["max"]
    assert rep["windows"] and sum(w["frames"] for w in rep["windows"]) <= rep["frames_judged"]
    assert rep["source"]["paced"] and rep["mode"] == "resize"
    assert json.loads(json.dumps(rep)) == rep


def test_multi_stream_bench_report(engine_dir: Path) -> None:
    rep = run_multi_stream_bench(engine_dir, 3, seconds=2.0, fps=10.0, frame_size=(60, 80), threads=1, window_s=1.0)
    assert rep["streams_count"] == len(rep["streams"]) == 3
    assert rep["frames_judged"] == sum(s["frames_judged"] for s in rep["streams"]) >= 3
    assert rep["dropped"] == sum(s["dropped"] for s in rep["streams"])
    assert all(s["frames_captured"] >= s["frames_judged"] >= 1 for s in rep["streams"])
    assert rep["batches"] >= 1 and 1 <= rep["mean_batch"] <= 3
    assert rep["latency_ms"]["p50"] <= rep["latency_ms"]["p99"] <= rep["latency_ms"]["max"]
    assert isinstance(rep["holds"], bool) and rep["process_cpu_percent"] > 0
    assert json.loads(json.dumps(rep)) == rep


def test_the_search_for_the_most_streams_doubles_then_bisects() -> None:
    def fake(n: int) -> dict:
        return {"streams_count": n, "holds": n <= 5}

    found = find_max_streams(fake, 30.0)
    assert found["max_streams"] == 5 and [t["streams_count"] for t in found["trials"]] == [1, 2, 4, 8, 6, 5]
    assert find_max_streams(fake, 30.0, limit=4)["max_streams"] == 4
    assert find_max_streams(lambda n: {"streams_count": n, "holds": False}, 30.0)["max_streams"] == 0


# -- no torch ------------------------------------------------------------------------------------------------


def test_the_bench_package_never_imports_torch() -> None:
    code = (
        "import sys, ism_edge.bench, ism_edge.bench.chain, ism_edge.bench.stream, ism_edge.bench.flops, "
        "ism_edge.bench.peak\n"
        "from ism_edge.bench.flops import chain_flops\n"
        "print(sorted(m for m in ('torch', 'ism_edge_training', 'ism_edge_engines') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_chain_flops_type() -> None:
    assert ChainFlops({}).per_input == 0


def test_mkv_clips_are_lossless(tmp_path: Path) -> None:
    import cv2

    path = write_video(tmp_path / "clip.mkv", 6, size=(96, 128))
    cap = cv2.VideoCapture(str(path))
    read = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        read.append(frame)
    cap.release()
    want = list(camera_frames(6, (96, 128)))
    assert len(read) == 6 and all(np.array_equal(a, b) for a, b in zip(read, want, strict=True))
