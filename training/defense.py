"""The full defense in PyTorch: the reference for ONNX Runtime and TensorRT (docs/architecture.md, "The defense chain").

x̂ = M(x); optional feedback reformation x̂ ← M(x̂) while ‖x̂ − M(x̂)‖₁ exceeds the
reconstruction threshold, up to ``feedback_rounds`` times. Scores (on the first pass, so they are
the MagNet detectors): reconstruction error ‖x − M(x)‖₁/(CHW), JSD between softmax(C(x)/T) and
softmax(C(M(x))/T) at the detector temperature, and P(attacked) = sigmoid(P(x − x̂)).
``flagged`` = any score over its calibrated threshold; ``label`` = argmax C(x̂) (or, with
``label_source="auto"``, argmax C(x) for inputs that are not flagged — the paper's §VI reading).

A bundle's :class:`~training.bundle.DefenseSpec` (its evaluation baseline) can leave parts out:
without the reformer x̂ = x and the label is argmax C(x); a detector that is not deployed scores
0 and never flags; a network no deployed part needs is not run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ism_edge.manifest import DEFAULT_DETECTOR_TEMPERATURE
from ism_edge_training.bundle import DefenseBundle, DefenseSpec
from ism_edge_training.models import js_divergence, reconstruction_error


@dataclass
class DefenseOutput:
    """Batched defense result; every tensor has the batch as its first axis."""

    x_hat: torch.Tensor
    logits: torch.Tensor  # logits used for the label (C(x̂) or C(x), see label_source)
    logits_raw: torch.Tensor  # C(x)
    logits_reformed: torch.Tensor  # C(x̂)
    recon_error: torch.Tensor
    jsd: torch.Tensor
    p_score: torch.Tensor
    flagged: torch.Tensor  # bool; all False when the bundle is not calibrated

    @property
    def label(self) -> torch.Tensor:
        return self.logits.argmax(dim=1)

    def scores(self) -> dict[str, torch.Tensor]:
        return {"recon_error": self.recon_error, "jsd": self.jsd, "p_score": self.p_score}


class Defense(nn.Module):
    """The deployed parts of a bundle (C, and M and P where used) wired as the defense; differentiable end to end."""

    def __init__(self, bundle: DefenseBundle, *, feedback_rounds: int | None = None) -> None:
        super().__init__()
        self.spec: DefenseSpec = bundle.defense
        self.classifier = bundle.classifier
        self.mapper = bundle.networks.get("mapper") if self.spec.needs_mapper else None
        self.perturbation = bundle.networks.get("perturbation") if self.spec.needs_perturbation else None
        self.t_detector = float(bundle.temperatures.get("detector", DEFAULT_DETECTOR_TEMPERATURE))
        self.detectors = self.spec.detectors
        self.thresholds = {s: float(bundle.thresholds[s]) for s in self.detectors if s in bundle.thresholds}
        self.feedback_rounds = bundle.feedback_rounds if feedback_rounds is None else feedback_rounds
        self.feedback_threshold: float | None = bundle.thresholds.get("recon_error")
        self.label_source = bundle.label_source

    def reform(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (x̂ after feedback rounds, first-pass reconstruction error)."""
        assert self.mapper is not None, "reform needs the mapping network"
        x_hat = self.mapper(x)
        recon = reconstruction_error(x, x_hat)
        thr = self.feedback_threshold
        for _ in range(self.feedback_rounds if thr is not None else 0):
            again = self.mapper(x_hat)
            still = reconstruction_error(x_hat, again) > (thr or 0.0)
            if not bool(still.any()):
                break
            x_hat = torch.where(still.view(-1, 1, 1, 1), again, x_hat)
        return x_hat, recon

    def forward(self, x: torch.Tensor) -> DefenseOutput:
        zero = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        logits_raw = self.classifier(x)
        if self.mapper is not None:
            x_hat, recon = self.reform(x)
            logits_ref = self.classifier(x_hat)
        else:
            x_hat, recon, logits_ref = x, zero, logits_raw
        jsd = js_divergence(logits_raw, logits_ref, self.t_detector) if "jsd" in self.detectors else zero
        p = torch.sigmoid(self.perturbation(x - x_hat)) if self.perturbation is not None else zero
        if not self.spec.reformer:
            recon = recon if "recon_error" in self.detectors else zero
            x_hat, logits_ref = x, logits_raw
        flagged = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if self.detectors and all(s in self.thresholds for s in self.detectors):
            scores = {"recon_error": recon, "jsd": jsd, "p_score": p}
            for s in self.detectors:
                flagged = flagged | (scores[s] > self.thresholds[s])
        if self.label_source == "auto":
            logits = torch.where(flagged.view(-1, 1), logits_ref, logits_raw)
        else:
            logits = logits_ref
        return DefenseOutput(x_hat, logits, logits_raw, logits_ref, recon, jsd, p, flagged)


def is_distilled(bundle: DefenseBundle) -> bool:
    """True when the deployed classifier came out of defensive distillation at T > 1."""
    st = bundle.stages.get("distill")
    return isinstance(st, dict) and "skipped" not in st and bundle.temperatures.get("train", 1.0) > 1.0


def attack_surrogate(bundle: DefenseBundle, name: str = "classifier") -> nn.Module:
    """The module attacks should differentiate for network ``name`` of the bundle.

    For distilled classifiers (and their teacher) this is ``logits / T`` (see
    :class:`ism_edge_training.models.ScaledLogits`); otherwise the network itself.
    """
    from ism_edge_training.models import ScaledLogits

    net = bundle.networks[name]
    if name in ("classifier", "teacher") and is_distilled(bundle):
        return ScaledLogits(net, 1.0 / bundle.temperatures["train"])
    return net
