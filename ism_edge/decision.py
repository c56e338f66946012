"""The host half of the defense chain (docs/architecture.md, "The defense chain"), in numpy:
written once, shared by every backend, :class:`~ism_edge.runtime.DefenseRuntime` and the build's
parity gate (``ism_edge_engines.parity``).

The networks run on a backend; what is decided on the host is:

* which samples go through another feedback round (:func:`feedback_reformation`): x̂ ← M(x̂)
  while the mapper's residual ‖x̂ − M(x̂)‖₁/(CHW) on x̂ exceeds ``thresholds["recon_error"]``;
* the verdict of each sample (:func:`decide`): the JSD between softmax(C(x)/T_det) and
  softmax(C(x̂)/T_det) (:func:`ism_edge.scores.jsd`), one flag per detector (score above its
  calibrated threshold), and the label probabilities at T_deploy chosen by ``label_source``.

The same rules are written in PyTorch by ``ism_edge_training.defense.Defense``; the parity gate compares
the two on real images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ism_edge import scores
from ism_edge.manifest import SCORE_NAMES, EngineManifest

if TYPE_CHECKING:
    from ism_edge.backends import ChainOutput


@dataclass(frozen=True)
class Decisions:
    """Per-sample verdict arrays of one batch of N.

    ``scores``: float64 [N] per score name; ``detector_flags``: bool [N] per score name (the
    score is above its threshold); ``probs``: float64 [N, K], the softmax at the deploy
    temperature that the label and confidence come from.
    """

    scores: dict[str, np.ndarray]
    detector_flags: dict[str, np.ndarray]
    probs: np.ndarray

    @property
    def flags(self) -> np.ndarray:
        """bool [N]: any detector flagged the sample."""
        flagged = np.zeros(len(self.probs), dtype=bool)
        for k in SCORE_NAMES:
            flagged |= self.detector_flags[k]
        return flagged

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.probs.argmax(axis=1))


def decide(out: ChainOutput, manifest: EngineManifest) -> Decisions:
    """Scores, flags and label probabilities of a batch of chain outputs (docs/architecture.md).

    JSD between softmax(C(x)/T_det) and softmax(C(x̂)/T_det); a detector flags a sample when its
    score is above the manifest's threshold; probabilities of C(x̂) at T_deploy (with
    ``label_source="auto"``: of C(x) for inputs that are not flagged, the paper's §VI reading).
    """
    per_sample = {
        "recon_error": out.recon_error.astype(np.float64),
        "jsd": scores.jsd(out.logits_raw, out.logits_reformed, manifest.temperatures["detector"]).astype(np.float64),
        "p_score": out.p_score.astype(np.float64),
    }
    detector_flags = {k: per_sample[k] > manifest.thresholds[k] for k in SCORE_NAMES}
    decided = Decisions(
        per_sample, detector_flags, scores.softmax(out.logits_reformed, manifest.temperatures["deploy"])
    )
    if manifest.label_source == "auto":
        raw = scores.softmax(out.logits_raw, manifest.temperatures["deploy"])
        decided = Decisions(per_sample, detector_flags, np.where(decided.flags[:, None], decided.probs, raw))
    return decided


#: ``remap(active)``: M(x̂) of the samples ``active`` (ascending batch indices), kept by the
#: backend; returns their residuals ‖x̂ − M(x̂)‖₁/(CHW), one per index.
Remap = Callable[[np.ndarray], np.ndarray]
#: ``replace(rows, still)``: x̂ ← M(x̂) for the batch rows ``rows`` (= ``active[still]``, where
#: ``still`` masks the last ``remap``'s indices).
Replace = Callable[[np.ndarray, np.ndarray], None]


def feedback_reformation(rounds: int, threshold: float, n: int, remap: Remap, replace: Replace) -> np.ndarray:
    """Feedback reformation of a batch of ``n`` first-pass reconstructions x̂; returns the rounds
    that replaced each sample's x̂ (int32 [n]).

    Up to ``rounds`` times: re-map the samples still active, and replace x̂ by M(x̂) for those
    whose residual is above ``threshold``; the others are final (a converged sample never changes
    again, so this equals re-mapping the whole batch as ``ism_edge_training.defense.Defense.reform`` does).
    Stops early once no sample is above the threshold.
    """
    counts = np.zeros(n, dtype=np.int32)
    active = np.arange(n)
    for _ in range(rounds):
        still = np.asarray(remap(active)).reshape(-1) > threshold
        if not still.any():
            break
        active = active[still]
        replace(active, still)
        counts[active] += 1
    return counts


__all__ = ["Decisions", "Remap", "Replace", "decide", "feedback_reformation"]
