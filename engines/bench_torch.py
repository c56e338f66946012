"""The PyTorch columns of ``ism-edge bench``: the bundle's ``ism_edge_training.defense.Defense``, eager and
through ``torch.compile`` (inductor).

Kept outside :mod:`ism_edge` because it imports torch. :class:`TorchEagerChain` runs the same
steps as :meth:`ism_edge_training.defense.Defense.forward` (which is the reference every compiled chain is
checked against) with a clock between them, so its per-stage times line up with the runtime's:
``upload`` (numpy → tensor on the device), ``mapping`` (M and the feedback rounds),
``classifier`` (C(x) and C(x̂), two calls as in ``Defense``), ``detectors`` (JSD, P, thresholds,
labels) and ``download`` (labels, flags and scores back to numpy).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ism_edge.bench.chain import ChainResult
from ism_edge.errors import missing_dependency


class TorchEagerChain:
    """PyTorch eager inference of a bundle's defense, with ``threads`` intra-op threads.

    ``device``: ``"cpu"`` or a CUDA device (``"cuda"``, ``"cuda:N"``). Pixels are float32 NCHW
    in [0, 1]; the result holds per-input labels and flags (docs/architecture.md, "The defense chain"). ``thresholds``
    replaces the bundle's (an engine manifest's, after ``ism-edge calibrate``), so the flags are
    those of the deployed rule.
    """

    def __init__(self, bundle_dir: str | Path, *, threads: int, device: str = "cpu", feedback_rounds: int | None = None,
                 thresholds: dict[str, float] | None = None) -> None:
        try:
            import torch
        except ImportError:
            raise missing_dependency("torch", "train", "the PyTorch-eager benchmark column") from None
        from ism_edge_training.bundle import DefenseBundle
        from ism_edge_training.defense import Defense

        self._torch = torch
        torch.set_num_threads(threads)
        self.threads = threads
        self.device = torch.device(device)
        self.bundle_dir = Path(bundle_dir)
        bundle = DefenseBundle.load(bundle_dir, map_location=str(self.device))
        bundle.refuse_untrained(bundle_dir, "benchmarked")
        if thresholds is not None:
            bundle.thresholds = dict(thresholds)
        self.defense = Defense(bundle, feedback_rounds=feedback_rounds).eval()

    def describe(self) -> str:
        return (f"torch {self._torch.__version__} eager on {self.device} ({self.threads} threads), "
                f"bundle {self.bundle_dir}")

    def _sync(self) -> float:
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def run(self, x: np.ndarray) -> ChainResult:
        from ism_edge_training.bundle import SCORES
        from ism_edge_training.models import js_divergence

        torch, d = self._torch, self.defense
        with torch.inference_mode():
            t0 = time.perf_counter()
            xt = torch.from_numpy(x).to(self.device)
            t1 = self._sync()
            x_hat, recon = d.reform(xt)
            t2 = self._sync()
            logits_raw = d.classifier(xt)
            logits_ref = d.classifier(x_hat)
            t3 = self._sync()
            jsd = js_divergence(logits_raw, logits_ref, d.t_detector)
            p = torch.sigmoid(d.perturbation(xt - x_hat))  # type: ignore[misc]
            if all(s in d.thresholds for s in SCORES):
                flagged = (
                    (recon > d.thresholds["recon_error"]) | (jsd > d.thresholds["jsd"]) | (p > d.thresholds["p_score"])
                )
            else:
                flagged = torch.zeros(xt.shape[0], dtype=torch.bool, device=xt.device)
            logits = (
                torch.where(flagged.view(-1, 1), logits_ref, logits_raw) if d.label_source == "auto" else logits_ref
            )
            labels = logits.argmax(dim=1)
            t4 = self._sync()
            result = ChainResult({}, labels.cpu().numpy(), flagged.cpu().numpy())
            for score in (recon, jsd, p):
                score.cpu().numpy()
            t5 = time.perf_counter()
        result.stages_ms = {
            "upload": (t1 - t0) * 1e3,
            "mapping": (t2 - t1) * 1e3,
            "classifier": (t3 - t2) * 1e3,
            "detectors": (t4 - t3) * 1e3,
            "download": (t5 - t4) * 1e3,
        }
        return result

    def close(self) -> None:
        del self.defense


class TorchCompiledChain(TorchEagerChain):
    """:class:`TorchEagerChain` with its three networks compiled by ``torch.compile`` (inductor).

    ``compile_seconds[batch]``: the wall time of the first call at that batch size (compilation
    and warm-up), which the benchmark reports apart. Inductor on the CPU needs a C++ compiler: a
    missing one is a one-line :class:`~ism_edge.errors.MissingDependencyError` at construction.
    """

    def __init__(self, bundle_dir: str | Path, *, threads: int, device: str = "cpu", feedback_rounds: int | None = None,
                 thresholds: dict[str, float] | None = None) -> None:
        super().__init__(bundle_dir, threads=threads, device=device, feedback_rounds=feedback_rounds,
                         thresholds=thresholds)
        if self.device.type == "cpu" and cxx_compiler() is None:
            from ism_edge.errors import MissingDependencyError

            raise MissingDependencyError("torch.compile (inductor) on the CPU needs a C++ compiler, and none is on "
                                         "PATH: install g++ (apt-get install g++) or clang++")
        torch, d = self._torch, self.defense
        for name in ("mapper", "classifier", "perturbation"):
            module = getattr(d, name)
            if module is not None:
                setattr(d, name, torch.compile(module, backend="inductor"))
        self.compile_seconds: dict[int, float] = {}

    def describe(self) -> str:
        return (f"torch {self._torch.__version__} torch.compile (inductor) on {self.device} ({self.threads} threads), "
                f"bundle {self.bundle_dir}")

    def run(self, x: np.ndarray) -> ChainResult:
        batch = int(x.shape[0])
        if batch in self.compile_seconds:
            return super().run(x)
        t0 = time.perf_counter()
        result = super().run(x)
        self.compile_seconds[batch] = time.perf_counter() - t0
        return result


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on the CPU (its configured one, else the usual names), or None."""
    import shutil

    try:
        from torch._inductor import config

        configured = config.cpp.cxx
        names = [c for c in (configured if isinstance(configured, (tuple, list)) else (configured,)) if c]
    except (ImportError, AttributeError):
        names = []
    for name in (*names, "g++", "c++", "clang++"):
        if isinstance(name, str) and (found := shutil.which(name)):
            return found
    return None
