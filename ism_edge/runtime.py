"""``DefenseRuntime``: load an engine directory, turn frames into verdicts (docs/runtime.md, "Embedding").

Usable without the CLI, e.g. from a ROS 2 image callback (see ``docs/runtime.md``)::

    from ism_edge import DefenseRuntime

    runtime = DefenseRuntime("engines/cifar10", color_order="BGR")
    verdict = runtime.process(frame)          # H×W×3 uint8, any size
    if verdict.flagged: ...

Verdict semantics are those of ``ism_edge_training.defense.Defense`` (docs/architecture.md, "The defense
chain"): x̂ = M(x) with optional
feedback rounds; scores recon_error (first pass), JSD between softmax(C(x)/T_det) and
softmax(C(x̂)/T_det), P(x, x̂); flagged = any score above its calibrated threshold; label =
argmax C(x̂) with its softmax confidence at T_deploy. Shapes, thresholds, temperatures and class
names come from the engine manifest.

One runtime may be shared between threads (calls are serialised by a lock). ``submit`` and
``collect`` split ``process`` in two so that a caller can hand in frame N+1 before it collects
frame N: on TensorRT, N+1's upload then overlaps N's compute.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from ism_edge import _checks as check
from ism_edge import preprocess
from ism_edge.backends import STAGES, Backend, ChainOutput, Job, select_backend
from ism_edge.decision import Decisions, decide
from ism_edge.errors import EngineError, FrameError
from ism_edge.manifest import MANIFEST_NAME, MAX_FEEDBACK_ROUNDS, SCORE_NAMES, EngineManifest, load_manifest
from ism_edge.verdict import TileScores, Verdict, severity

THREADS_PER_CORE = 4  # beyond this, more threads only add start-up time and memory


def cores_available() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def max_threads() -> int:
    """The most ``threads`` :class:`RuntimeOptions` accepts: :data:`THREADS_PER_CORE` per core available."""
    return THREADS_PER_CORE * cores_available()


@dataclass(frozen=True)
class RuntimeOptions:
    """How a :class:`DefenseRuntime` runs an engine directory."""

    #: ``"tensorrt"``, ``"onnxruntime"``, or ``None``/``"auto"``: TensorRT when it is usable here.
    backend: str | None = None
    #: ``"auto"``, ``"cpu"`` (ONNX Runtime only), ``"cuda"`` or ``"cuda:N"``.
    device: str = "auto"
    #: ``"resize"``: the whole frame becomes one model input; ``"tile"``: model-size tiles, judged
    #: as one batch, with per-tile scores (a heat map).
    mode: str = "resize"
    #: Channel order of the frames passed in: ``"BGR"`` (OpenCV, ROS ``bgr8``) or ``"RGB"`` (PIL).
    color_order: str = "BGR"
    #: Tile mode: ``(rows, cols)`` resizes the frame to exactly that grid of tiles first;
    #: ``None`` tiles it at its native resolution.
    tile_grid: tuple[int, int] | None = None
    #: Most feedback reformation rounds (x̂ ← M(x̂) while the reconstruction error is above its
    #: threshold); ``None``: the manifest's.
    feedback_rounds: int | None = None
    #: Attach the reformed (purified) image to every verdict.
    purified: bool = False
    #: ONNX Runtime intra-op threads, and the threads that preprocess the frames of a batch;
    #: ``None``: one per core. At most :func:`max_threads`.
    threads: int | None = None
    #: Whether ONNX Runtime's idle threads spin waiting for work; ``None``: off, which is faster
    #: for the chain's three sessions (docs/performance.md, "Session options").
    spinning: bool | None = None
    #: Check the engine files' SHA-256 hashes against the manifest when loading.
    verify: bool = True

    def __post_init__(self) -> None:
        if self.backend not in (None, "auto", "tensorrt", "onnxruntime"):
            raise ValueError(f"backend must be 'tensorrt', 'onnxruntime' or 'auto', got {self.backend!r}")
        if self.mode not in preprocess.MODES:
            raise ValueError(f"mode must be one of {', '.join(preprocess.MODES)}, got {self.mode!r}")
        if self.color_order not in preprocess.COLOR_ORDERS:
            raise ValueError(
                f"color_order must be one of {', '.join(preprocess.COLOR_ORDERS)}, got {self.color_order!r}"
            )
        if self.tile_grid is not None and (len(self.tile_grid) != 2 or min(self.tile_grid) < 1):
            raise ValueError(f"tile_grid must be (rows, cols) with both >= 1, got {self.tile_grid!r}")
        if self.feedback_rounds is not None and not 0 <= self.feedback_rounds <= MAX_FEEDBACK_ROUNDS:
            raise ValueError(f"feedback_rounds must be in [0, {MAX_FEEDBACK_ROUNDS}], got {self.feedback_rounds}")
        if self.threads is not None and not 1 <= self.threads <= max_threads():
            raise ValueError(
                f"threads must be between 1 and {max_threads()} ({THREADS_PER_CORE} per core on the "
                f"{cores_available()} cores available), got {self.threads}"
            )


@dataclass
class _FrameMeta:
    start: int
    stop: int
    frame_size: tuple[int, int]
    layout: preprocess.TileLayout | None
    preprocess_ms: float


@dataclass
class Pending:
    """Frames handed to :meth:`DefenseRuntime.submit`; :meth:`DefenseRuntime.collect` finishes them."""

    frames: list[_FrameMeta]
    jobs: list[Job] = field(default_factory=list)
    outputs: dict[int, ChainOutput] = field(default_factory=dict)
    purified: bool = False
    started: float = 0.0
    collected: bool = False


def _check_compatible(manifest: EngineManifest, directory: Path, device: str) -> None:
    """The engines engineer's target check (GPU, TensorRT/ORT version), when it is installed;
    ``device`` (``auto``, ``cuda``, ``cuda:N``, ``cpu``) names the GPU a TensorRT engine runs on."""
    try:
        from ism_edge.compat import check_compatible  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return
    gpu = check.cuda_index(device) or 0
    check_compatible(manifest, directory, gpu=gpu)


class DefenseRuntime:
    """The compiled defense of one engine directory, on the best available backend.

    ``DefenseRuntime(engine_dir, **options)`` with the fields of :class:`RuntimeOptions` as
    keywords (or ``options=RuntimeOptions(...)``). Raises a one-line
    :class:`~ism_edge.errors.EngineError` for a missing, corrupt or mismatched directory and
    :class:`~ism_edge.errors.MissingDependencyError` for a backend that cannot run here.
    """

    def __init__(self, engine_dir: str | Path, options: RuntimeOptions | None = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("pass either options=RuntimeOptions(...) or keyword options, not both")
        self.options = options if options is not None else RuntimeOptions(**kwargs)
        self.directory = Path(engine_dir)
        self.manifest = load_manifest(self.directory, verify_files=self.options.verify)
        for key in ("deploy", "detector"):
            if key not in self.manifest.temperatures:
                raise EngineError(
                    f"{self.directory / MANIFEST_NAME} has no temperatures[{key!r}]: "
                    "rebuild the engines with 'ism-edge build'"
                )
        if self.manifest.color_order not in preprocess.COLOR_ORDERS:
            raise EngineError(
                f"{self.directory / MANIFEST_NAME}: color_order {self.manifest.color_order!r} is not RGB or BGR"
            )
        cls = select_backend(self.options.backend, self.manifest, self.directory)
        if cls.name == self.manifest.backend:
            _check_compatible(self.manifest, self.directory, self.options.device)
        extra = {"spinning": self.options.spinning} if cls.name == "onnxruntime" else {}
        self.backend: Backend = cls(
            self.directory,
            self.manifest,
            feedback_rounds=self.options.feedback_rounds,
            device=self.options.device,
            threads=self.options.threads,
            **extra,
        )
        self.backend.activate()
        self._preparer = preprocess.FramePreparer(
            self.input_shape, mode=self.options.mode, tile_grid=self.options.tile_grid,
            color_order=self.options.color_order, model_order=self.manifest.color_order,
            workers=self.options.threads or os.cpu_count() or 1,
        )
        self._lock = threading.RLock()
        self._buffers = threading.local()
        self._inflight: deque[tuple[Pending, int, Job]] = deque()

    # -- properties ------------------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one model input."""
        return self.manifest.input_shape

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.manifest.class_names

    @property
    def thresholds(self) -> dict[str, float]:
        return {k: self.manifest.thresholds[k] for k in SCORE_NAMES}

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def describe(self) -> str:
        """One line: backend, device, precision and mode (for logs)."""
        c, h, w = self.input_shape
        return (
            f"{self.backend.describe()}; {self.manifest.precision} engines, input {c}x{h}x{w}, "
            f"{self.manifest.num_classes} classes, mode {self.options.mode}, "
            f"feedback rounds {self.backend.feedback_rounds}, frames {self.options.color_order}"
        )

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the backend (engines, GPU buffers)."""
        with self._lock:
            self._inflight.clear()
            self.backend.deactivate()
        self._preparer.close()

    def __enter__(self) -> DefenseRuntime:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def warmup(self, batch: int = 1) -> None:
        """Run the chain once on mid-grey inputs so the first real frame is not slower."""
        c, h, w = self.input_shape
        with self._lock:
            self.backend.infer(np.full((min(batch, self.backend.max_batch), c, h, w), 0.5, dtype=np.float32))

    # -- processing ------------------------------------------------------------------------------
    def process(self, frame: np.ndarray, *, purified: bool | None = None) -> Verdict:
        """The verdict on one frame (``H×W×3`` uint8 of any size, in ``color_order``)."""
        return self.collect(self.submit(frame, purified=purified))[0]

    def process_batch(self, frames: Sequence[np.ndarray], *, purified: bool | None = None) -> list[Verdict]:
        """Verdicts on several frames, batched up to the engines' maximum batch."""
        if len(frames) == 0:
            return []
        return self.collect(self.submit_batch(frames, purified=purified))

    def submit(self, frame: np.ndarray, *, purified: bool | None = None) -> Pending:
        """Preprocess ``frame`` and start the chain on it; finish with :meth:`collect`."""
        return self.submit_batch([frame], purified=purified)

    def submit_batch(self, frames: Sequence[np.ndarray], *, purified: bool | None = None) -> Pending:
        """Preprocess ``frames`` and start the chain on them; finish with :meth:`collect`.

        Raises :class:`~ism_edge.errors.FrameError` (nothing is started) when a frame has the
        wrong shape, dtype or non-finite values.
        """
        started = time.perf_counter()
        checked: list[np.ndarray] = []
        check_ms: list[float] = []
        counts: list[int] = []
        for i, frame in enumerate(frames):
            t0 = time.perf_counter()
            try:
                checked.append(preprocess.check_frame(frame))
            except FrameError as e:
                raise FrameError(f"frame {i} of the batch: {e}" if len(frames) > 1 else str(e)) from None
            counts.append(self._preparer.count(checked[-1]))
            check_ms.append((time.perf_counter() - t0) * 1e3)
        x_all = self._input_buffer(sum(counts))
        metas: list[_FrameMeta] = []
        count = 0
        prepared = self._preparer.prepare(checked, x_all)
        for frame, n, ms, (layout, prep_ms) in zip(checked, counts, check_ms, prepared, strict=True):
            metas.append(_FrameMeta(count, count + n, frame.shape[:2], layout, ms + prep_ms))
            count += n
        want = self.options.purified if purified is None else purified
        pending = Pending(metas, purified=want, started=started)
        step = self.backend.max_batch
        with self._lock:
            for lo in range(0, len(x_all), step):
                self._enqueue(pending, x_all[lo : lo + step])
        return pending


    def _input_buffer(self, n: int) -> np.ndarray:
        """``[n, C, H, W]`` float32 model inputs, a view of this thread's reusable buffer.

        Backends copy their input when a job is enqueued (into pinned or staging memory), so the
        buffer is free again once :meth:`submit_batch` returns.
        """
        buf: np.ndarray | None = getattr(self._buffers, "inputs", None)
        if buf is None or len(buf) < n:
            buf = np.empty((max(n, self.backend.max_batch), *self.input_shape), dtype=np.float32)
            self._buffers.inputs = buf
        return buf[:n]

    def _enqueue(self, pending: Pending, x: np.ndarray) -> None:
        while len(self._inflight) >= self.backend.max_in_flight:
            self._resolve_oldest()
        index = len(pending.jobs)
        job = self.backend.enqueue(np.ascontiguousarray(x), x_hat=pending.purified)
        pending.jobs.append(job)
        self._inflight.append((pending, index, job))

    def _resolve_oldest(self) -> None:
        owner, index, job = self._inflight.popleft()
        owner.outputs[index] = self.backend.wait(job)

    def ready(self, pending: Pending) -> bool:
        """Whether :meth:`collect` would return ``pending``'s verdicts without waiting for the device.

        ONNX Runtime computes in :meth:`submit`, so its frames are ready at once: a loop that holds
        frames in flight to overlap a GPU's work collects them now instead of after the next batch.
        """
        with self._lock:
            if pending.collected:
                return False
            live = {id(job) for _, _, job in self._inflight}
            return all(i in pending.outputs or (id(job) in live and self.backend.done(job))
                       for i, job in enumerate(pending.jobs))

    def collect(self, pending: Pending) -> list[Verdict]:
        """Wait for the frames of ``pending`` and return their verdicts, in order."""
        with self._lock:
            if pending.collected:
                raise RuntimeError("these frames were already collected")
            while len(pending.outputs) < len(pending.jobs):
                if not self._inflight:
                    raise RuntimeError("these frames belong to another runtime or were dropped by close()")
                self._resolve_oldest()
            pending.collected = True
        return self._verdicts(pending)

    # -- verdicts ----------------------------------------------------------------------------------
    def _verdicts(self, pending: Pending) -> list[Verdict]:
        """One verdict per frame of ``pending``, from the chain outputs of its jobs."""
        t0 = time.perf_counter()
        parts = [pending.outputs[i] for i in range(len(pending.jobs))]
        out = ChainOutput.concatenate(parts)
        decided = decide(out, self.manifest)
        host_ms = (time.perf_counter() - t0) * 1e3
        verdicts = []
        for meta in pending.frames:
            timings = _frame_timings(meta, pending.jobs, parts, host_ms)
            t1 = time.perf_counter()
            image = self._purified_image(out, meta) if pending.purified else None
            timings["download"] += (time.perf_counter() - t1) * 1e3 if image is not None else 0.0
            timings["total"] = (time.perf_counter() - pending.started) * 1e3
            verdicts.append(self._frame_verdict(meta, out, decided, timings, image))
        return verdicts

    def _frame_verdict(self, meta: _FrameMeta, out: ChainOutput, decided: Decisions, timings: dict[str, float],
                       image: np.ndarray | None) -> Verdict:
        """A frame's verdict: its highest score per detector, and the label of its mean probabilities."""
        sl = slice(meta.start, meta.stop)
        frame_scores = {k: float(decided.scores[k][sl].max()) for k in SCORE_NAMES}
        mean_probs = decided.probs[sl].mean(axis=0)
        label_index = int(mean_probs.argmax())
        flagged_by = tuple(k for k in SCORE_NAMES if frame_scores[k] > self.thresholds[k])
        return Verdict(
            label=self.manifest.class_names[label_index],
            label_index=label_index,
            confidence=float(mean_probs[label_index]),
            scores=frame_scores,
            thresholds=self.thresholds,
            flagged=bool(flagged_by),
            flagged_by=flagged_by,
            timings_ms=timings,
            feedback_rounds=int(out.rounds[sl].max()),
            mode=self.options.mode,
            frame_size=(int(meta.frame_size[0]), int(meta.frame_size[1])),
            tiles=None if meta.layout is None else self._tile_scores(meta, meta.layout, decided),
            purified=image,
        )

    def _tile_scores(self, meta: _FrameMeta, layout: preprocess.TileLayout, decided: Decisions) -> TileScores:
        """Tile mode: each tile's box, scores, flag, label and severity (the heat map)."""
        sl = slice(meta.start, meta.stop)
        tile_scores = {k: tuple(float(v) for v in decided.scores[k][sl]) for k in SCORE_NAMES}
        return TileScores(
            rows=layout.rows,
            cols=layout.cols,
            boxes=layout.boxes,
            scores=tile_scores,
            flagged=tuple(bool(f) for f in decided.flags[sl]),
            labels=tuple(self.manifest.class_names[int(i)] for i in decided.labels[sl]),
            severity=tuple(
                severity({k: tile_scores[k][j] for k in SCORE_NAMES}, self.thresholds)
                for j in range(meta.stop - meta.start)
            ),
        )

    def _purified_image(self, out: ChainOutput, meta: _FrameMeta) -> np.ndarray | None:
        """The frame's reformed image x̂ in the caller's colour order (tiles stitched back), if the chain returned it."""
        if out.x_hat is None:
            return None
        kw = {"color_order": self.options.color_order, "model_order": self.manifest.color_order}
        if meta.layout is not None:
            return preprocess.stitch_tiles(out.x_hat[meta.start:meta.stop], meta.layout, **kw)
        return preprocess.from_model_output(out.x_hat[meta.start], **kw)


def _frame_timings(
    meta: _FrameMeta, jobs: Sequence[Job], parts: Sequence[ChainOutput], host_ms: float
) -> dict[str, float]:
    """A frame's stage times in ms: its preprocessing, the device stages of every job that held
    one of its rows, and the host's decision time (charged to ``detectors``)."""
    timings = {"preprocess": meta.preprocess_ms, **{s: 0.0 for s in STAGES}}
    lo = 0
    for job, part in zip(jobs, parts, strict=True):
        hi = lo + job.batch
        if lo < meta.stop and meta.start < hi:
            for k, v in part.timings_ms.items():
                timings[k] = timings.get(k, 0.0) + v
        lo = hi
    timings["detectors"] += host_ms
    return timings
