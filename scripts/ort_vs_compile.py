"""The whole defense chain through ONNX Runtime and torch.compile, calls interleaved (A, B, A, B, ...).

    python scripts/ort_vs_compile.py BUNDLE ENGINE_DIR [--batches 1,32] [--calls 200] [--threads 2]
                                     [--profile DIR]

``ism-edge bench`` runs its columns one after the other, so on a machine shared with other work a
burst of load lands on one column and not the other. Here the two chains alternate call by call
on the same inputs and the report gives the median and the minimum of each (the minimum is the
best estimate of the unloaded speed when the load comes and goes). Both chains start from model
inputs (preprocessing is the same code for both and is left out). ``--profile DIR`` also writes
ONNX Runtime's per-operator profile of each session (JSON, chrome://tracing) and prints the
operators that take the most time.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ism_edge.bench.frames import camera_frames
from ism_edge.preprocess import FramePreparer, check_frame
from ism_edge.runtime import DefenseRuntime
from ism_edge_engines.bench_torch import TorchCompiledChain


def inputs(runtime: DefenseRuntime, n: int) -> np.ndarray:
    """``n`` model inputs from the bench's camera frames (640×480, resize mode)."""
    prep = FramePreparer(runtime.input_shape, mode="resize", color_order="BGR",
                         model_order=runtime.manifest.color_order)
    x = np.empty((n, *runtime.input_shape), dtype=np.float32)
    for i, frame in enumerate(camera_frames(n, (480, 640))):
        prep.prepare([check_frame(frame)], x[i : i + 1])
    prep.close()
    return x


def top_operators(profile: str, k: int = 8) -> list[tuple[str, float]]:
    """The ``k`` operator types with the most total time (ms) in an ONNX Runtime profile."""
    events = json.loads(Path(profile).read_text())
    total: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            total[e.get("args", {}).get("op_name", "?")] += e.get("dur", 0) / 1e3
    return total.most_common(k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("engine_dir")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", type=Path, default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    runtime = DefenseRuntime(args.engine_dir, device="cpu", threads=args.threads)
    compiled = TorchCompiledChain(args.bundle, threads=args.threads, thresholds=runtime.thresholds)
    x_all = inputs(runtime, max(batches) * 4)
    report = []
    for batch in batches:
        xs = [np.ascontiguousarray(x_all[k * batch : (k + 1) * batch]) for k in range(4)]
        t0 = time.perf_counter()
        compiled.run(xs[0])
        compile_s = time.perf_counter() - t0
        for _ in range(3):
            runtime.backend.infer(xs[0])
            compiled.run(xs[0])
        ort_ms, tc_ms = [], []
        agree = []
        for k in range(args.calls):
            x = xs[k % 4]
            t0 = time.perf_counter()
            out = runtime.backend.infer(x)
            t1 = time.perf_counter()
            res = compiled.run(x)
            t2 = time.perf_counter()
            ort_ms.append((t1 - t0) * 1e3)
            tc_ms.append((t2 - t1) * 1e3)
            if k < 4:
                from ism_edge.decision import decide

                d = decide(out, runtime.manifest)
                agree.append((np.mean(d.labels == res.labels), np.mean(d.flags == res.flags)))
        row = {
            "batch": batch, "calls": args.calls, "torch_compile_s": compile_s,
            "onnxruntime_ms": {"median": float(np.median(ort_ms)), "min": float(np.min(ort_ms))},
            "torch_compile_ms": {"median": float(np.median(tc_ms)), "min": float(np.min(tc_ms))},
            "labels_agree": float(np.mean([a[0] for a in agree])), "flags_agree": float(np.mean([a[1] for a in agree])),
        }
        report.append(row)
        print(json.dumps(row))
    if args.profile is not None:
        import onnxruntime as ort

        args.profile.mkdir(parents=True, exist_ok=True)
        for role, path in runtime.backend.model_files.items():  # type: ignore[attr-defined]
            opts = ort.SessionOptions()
            opts.enable_profiling = True
            opts.profile_file_prefix = str(args.profile / role)
            opts.intra_op_num_threads = args.threads
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
            feed_x = np.ascontiguousarray(x_all[: max(batches)])
            feeds = {i.name: feed_x for i in sess.get_inputs()}  # the perturbation detector: (x, x_hat) = (x, x)
            for _ in range(50):
                sess.run(None, feeds)
            prof = sess.end_profiling()
            print(role, prof, top_operators(prof))


if __name__ == "__main__":
    main()
