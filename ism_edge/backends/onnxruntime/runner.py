"""ONNX Runtime backend: three InferenceSessions (mapper, classifier, perturbation) on the host.

The classifier runs once on the concatenated batch [x; x̂] (one call instead of two — faster on
the CPU provider, same numbers). Feedback rounds re-map only the samples that are still above
the reconstruction threshold, which gives the same result as re-mapping the whole batch and
keeping the converged samples (``ism_edge_training.defense.Defense.reform``): a converged sample never
changes again. Copies to and from a GPU (CUDA provider) happen inside ``session.run``; the
``upload`` stage is therefore 0 and ``download`` is the host-side collection of the outputs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ism_edge import _checks as check
from ism_edge._io import sha256_file
from ism_edge.backends import Backend, ChainOutput, Job, TensorInfo
from ism_edge.errors import EngineError, MissingDependencyError
from ism_edge.manifest import ROLES, EngineManifest


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError(
            "the ONNX Runtime backend needs the Python module 'onnxruntime', which is not installed: "
            "pip install 'ism-edge[onnxruntime]' (CPU) or 'ism-edge[onnxruntime-gpu]' (CUDA), not both"
        ) from None
    return onnxruntime


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class OnnxRuntimeBackend(Backend):
    """The defense chain on ONNX Runtime.

    ``device``: ``"auto"`` (CUDA provider when onnxruntime-gpu has it, else CPU), ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"``. ``threads``: intra-op threads (``None``: ONNX Runtime's default,
    one per core). ``spinning``: whether idle intra-op threads spin waiting for work (lower
    latency per operator, but they burn their core; ``None``: off, faster for this chain of three
    sessions — docs/performance.md, "Session options"). Runs the directory's ONNX Runtime models,
    or the ONNX sources of a TensorRT engine directory.
    """

    name = "onnxruntime"
    max_in_flight = 2

    def __init__(
        self,
        directory: str | Path,
        manifest: EngineManifest,
        *,
        feedback_rounds: int | None = None,
        device: str = "auto",
        threads: int | None = None,
        spinning: bool | None = None,
    ) -> None:
        super().__init__(directory, manifest, feedback_rounds=feedback_rounds, device=device, threads=threads)
        self.spinning = spinning
        self.model_files: dict[str, Path] = {}  # set on activation, once the provider is known
        self.providers: list[str] = []
        self._sessions: dict[str, Any] = {}
        self._bindings: dict[str, Any] = {}
        self._stage: np.ndarray | None = None
        self._recon: np.ndarray | None = None

    @classmethod
    def check_available(cls) -> None:
        _onnxruntime()

    def describe(self) -> str:
        src = "" if self.manifest.backend == "onnxruntime" else " (ONNX sources of a TensorRT engine directory)"
        if self.manifest.backend == "onnxruntime" and "CUDAExecutionProvider" in self.providers:
            src = " (ONNX sources: the saved models are optimized for the CPU)"
        return f"onnxruntime {_onnxruntime().__version__} [{', '.join(self.providers) or 'inactive'}]{src}"

    def _provider_list(self, ort: Any) -> list[Any]:
        available = ort.get_available_providers()
        has_cuda = "CUDAExecutionProvider" in available
        if self.device == "cpu" or (self.device == "auto" and not has_cuda):
            return ["CPUExecutionProvider"]
        if not has_cuda:
            raise MissingDependencyError(
                f"device {self.device!r} needs ONNX Runtime's CUDAExecutionProvider, but this onnxruntime "
                f"has only {', '.join(available)}: pip install onnxruntime-gpu, or use --device cpu"
            )
        device_id = check.cuda_index(self.device) or 0
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]

    def _activate_impl(self) -> None:
        ort = _onnxruntime()
        providers = self._provider_list(ort)
        # The directory's CPU-optimized models, or — for a TensorRT directory, or on the CUDA provider
        # (the saved models hold CPU-only fused ops) — the stored ONNX sources, hash-checked below and
        # optimized for the provider by ONNX Runtime at load.
        use_source = self.manifest.backend != "onnxruntime" or providers != ["CPUExecutionProvider"]
        self.model_files = {
            role: self.directory / (
                self.manifest.engines[role].onnx if use_source else self.manifest.engines[role].file
            )
            for role in ROLES
        }
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if self.threads is not None:
            opts.intra_op_num_threads = self.threads
        # Off unless asked: the chain's three sessions each own a thread pool, and spinning idle
        # threads of one steal the cores the next needs (docs/performance.md, "Session options").
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        recorded = self.manifest.parity.get("sources", {}) if isinstance(self.manifest.parity, dict) else {}
        for role, path in self.model_files.items():
            if not path.is_file():
                raise EngineError(f"{path} ({role}) is missing: rebuild the engines with 'ism-edge build'")
            source = self.manifest.engines[role].onnx
            # The ONNX sources only: load_manifest checked the engine files.
            if use_source and source in recorded and sha256_file(path) != recorded[source]:
                raise EngineError(
                    f"{path} ({role} ONNX source) does not match the hash recorded in the manifest "
                    "(corrupted or modified): rebuild the engines with 'ism-edge build'"
                )
            try:
                session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as e:  # onnxruntime raises its own exception types, all plain Exceptions
                raise EngineError(
                    f"{path} ({role}) cannot be loaded by ONNX Runtime {ort.__version__} ({_first_line(e)}): "
                    "the file is corrupt or was written for a newer runtime; rebuild with 'ism-edge build'"
                ) from None
            self._check_io(role, path, self._tensors(session.get_inputs()), self._tensors(session.get_outputs()),
                           extra_outputs=True)
            self._sessions[role] = session
        self.providers = list(self._sessions["mapper"].get_providers())
        self._bindings["mapper"] = self._sessions["mapper"].io_binding()

    @staticmethod
    def _tensors(args: Any) -> TensorInfo:
        """A session's inputs or outputs as :data:`~ism_edge.backends.TensorInfo` (symbolic dims: None)."""
        dtypes = {"tensor(float)": "float32", "tensor(float16)": "float16"}
        return {
            a.name: (dtypes.get(a.type, a.type), tuple(d if isinstance(d, int) else None for d in a.shape))
            for a in args
        }

    def _deactivate_impl(self) -> None:
        self._sessions.clear()
        self._bindings.clear()
        self._stage = self._recon = None

    def _map(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x_hat, recon = self._sessions["mapper"].run(["x_hat", "recon_error"], {"x": x})
        return x_hat, recon.reshape(-1)

    def _map_into(self, x: np.ndarray, x_hat: np.ndarray, recon: np.ndarray) -> None:
        """M(x) written straight into ``x_hat`` and ``recon`` (I/O binding: no output allocation)."""
        binding = self._bindings["mapper"]
        binding.bind_cpu_input("x", x)
        binding.bind_output("x_hat", "cpu", 0, np.float32, list(x_hat.shape), x_hat.ctypes.data)
        binding.bind_output("recon_error", "cpu", 0, np.float32, list(recon.shape), recon.ctypes.data)
        self._sessions["mapper"].run_with_iobinding(binding)

    def _buffers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The staging block ``[x; x̂]`` (``[2n, C, H, W]``) and the recon buffer for a batch of n.

        x and x̂ are the two halves of one contiguous block, so the classifier runs on both in
        one call and the perturbation network reads them in place: x̂ is never copied.
        """
        if self._stage is None or len(self._stage) < 2 * n:
            self._stage = np.empty((2 * max(n, self.max_batch), *self.input_shape), dtype=np.float32)
            self._recon = np.empty(max(n, self.max_batch), dtype=np.float32)
        assert self._recon is not None
        return self._stage[: 2 * n], self._recon[:n]

    def _enqueue_impl(self, x: np.ndarray, job: Job, *, want_x_hat: bool) -> ChainOutput:
        t = {"upload": 0.0, "mapping": 0.0, "classifier": 0.0, "detectors": 0.0, "download": 0.0}
        n = x.shape[0]
        t0 = time.perf_counter()
        stage, recon = self._buffers(n)
        x_in, x_hat = stage[:n], stage[n:]
        np.copyto(x_in, x)
        t1 = time.perf_counter()
        t["upload"] = t1 - t0

        self._map_into(x_in, x_hat, recon)
        remapped: list[np.ndarray] = []

        def remap(active: np.ndarray) -> np.ndarray:
            again, residual = self._map(np.ascontiguousarray(x_hat[active]))
            remapped[:] = [again]
            return residual

        def replace(rows: np.ndarray, still: np.ndarray) -> None:
            x_hat[rows] = remapped[0][still]

        rounds = self._reform(n, remap, replace)
        t2 = time.perf_counter()
        t["mapping"] = t2 - t1

        (logits,) = self._sessions["classifier"].run(["logits"], {"x": stage})
        t3 = time.perf_counter()
        t["classifier"] = t3 - t2

        (p_score,) = self._sessions["perturbation"].run(["p_score"], {"x": x_in, "x_hat": x_hat})
        t4 = time.perf_counter()
        t["detectors"] = t4 - t3

        out = ChainOutput(
            recon_error=recon.copy(),
            logits_raw=np.asarray(logits[:n], dtype=np.float32),
            logits_reformed=np.asarray(logits[n:], dtype=np.float32),
            p_score=np.asarray(p_score, dtype=np.float32).reshape(-1),
            rounds=rounds,
            x_hat=x_hat.copy() if want_x_hat else None,
        )
        t["download"] = time.perf_counter() - t4
        out.timings_ms = {k: v * 1e3 for k, v in t.items()}
        return out

    def _wait_impl(self, job: Job) -> ChainOutput:
        result: ChainOutput = job.payload
        return result
