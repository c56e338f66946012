"""White-box adaptive attack on the whole defense (docs/evaluation.md, "Threat models").

The protocol of Carlini & Wagner's break of MagNet ("MagNet and 'Efficient Defenses Against
Adversarial Attacks' are Not Robust to Adversarial Examples", 2017) and of Tramèr, Carlini,
Brendel & Madry, "On Adaptive Attacks to Adversarial Example Defenses" (2020): L∞ PGD that
differentiates through the deployed defense — mapping network M with its feedback loop, the
classifier on x̂, the perturbation classifier P and every detector — and adds a term that
pushes each detector score under its calibrated threshold. Where a step's gradient is useless
or absent, BPDA (Athalye, Carlini & Wagner 2018) replaces it with the identity on the backward
pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ism_edge_training.attacks.base import (
    Attack,
    bpda,
    check_int,
    check_positive,
    check_seed,
    input_gradient,
    make_generator,
    project,
    random_start,
)
from ism_edge_training.attacks.square import margin_loss
from ism_edge_training.bundle import SCORES
from ism_edge_training.models import reconstruction_error

if TYPE_CHECKING:
    from ism_edge_training.defense import Defense, DefenseOutput

BPDA_MODES = ("none", "feedback", "mapper")
LOSSES = ("margin", "ce")


class _SurrogateDefense:
    """The defense with a BPDA reformer: same forward values, approximated backward pass.

    Delegates every attribute to the wrapped :class:`~training.defense.Defense` except
    ``reform``, and runs the defense's own ``forward`` on itself, so scores, flags and labels are
    those of the deployed defense. ``"feedback"``: the feedback rounds x̂ ← M(x̂) are the
    identity on the backward pass (gradients flow through the first pass M(x)); ``"mapper"``: M
    with its feedback loop is the identity on the backward pass (the classic BPDA for a
    denoiser); the reconstruction-error detector keeps its exact first-pass gradient.
    """

    def __init__(self, defense: Defense, mode: str) -> None:
        self._defense = defense
        self._mode = mode

    def __getattr__(self, name: str) -> Any:
        return getattr(self._defense, name)

    def reform(self, x: Tensor) -> tuple[Tensor, Tensor]:
        first = self._defense.mapper(x)
        recon = reconstruction_error(x, first)
        with torch.no_grad():
            final = self._defense.reform(x)[0]
        if self._mode == "feedback":
            return bpda(lambda _: final, first), recon
        return bpda(lambda _: final, x), recon

    def __call__(self, x: Tensor) -> DefenseOutput:
        return type(self._defense).forward(self, x)  # type: ignore[arg-type]


class AdaptiveAttack(Attack):
    """L∞ PGD against the full defense with a detector-evasion term (white-box, adaptive).

    Each step ascends, per sample,
    ``L(logits, y) − lam · Σ_s relu((score_s − thr_s)/thr_s + margin)`` over the scores
    deployed scores s ⊆ {recon_error, jsd, p_score} and their calibrated thresholds, where ``logits`` are the
    defense's label logits (C(x̂), or C(x) for unflagged inputs with ``label_source="auto"``).
    ``loss="margin"`` (default) is Carlini & Wagner's objective min(max_{j≠y} z_j − z_y, 0): it
    stops pulling once the sample is misclassified, leaving the step to the detector term, and
    its sign-gradient does not vanish on the saturated logits of a distilled classifier (Carlini &
    Wagner 2016); ``loss="ce"`` is the cross-entropy. The detector term is zero once a score sits
    ``margin`` (relative) under its threshold. Without calibrated thresholds the detector term is
    dropped (nothing can be flagged).

    ``bpda``: ``False``/``"none"`` differentiates the defense exactly (the k-sparse top-k and the
    feedback selection are piecewise differentiable); ``"feedback"`` treats the feedback rounds
    as the identity on the backward pass; ``True``/``"mapper"`` treats the whole mapping network
    (with feedback) as the identity on the backward pass.

    ``steps`` iterations of size ``alpha`` (default 2.5·ε/steps), ``restarts`` random restarts
    (``random_start``), ``seed`` for repeatable starts. Every iterate of every restart is scored
    by the defense itself, and each sample keeps the first iterate that is misclassified and not
    flagged, else the latest one that is not flagged, else the last one. Pixels in [0, 1], ε on
    that scale.
    """

    supports_start = True

    def __init__(
        self,
        defense: Defense,
        eps: float,
        *,
        steps: int = 50,
        alpha: float | None = None,
        restarts: int = 1,
        lam: float = 1.0,
        bpda: bool | str = False,
        random_start: bool = True,
        seed: int | None = None,
        margin: float = 0.05,
        loss: str = "margin",
    ) -> None:
        super().__init__(defense, eps)
        missing = [a for a in ("mapper", "classifier", "perturbation", "thresholds", "reform")
                   if not hasattr(defense, a)]
        if missing:
            raise ValueError(
                f"AdaptiveAttack needs a ism_edge_training.defense.Defense (Defense(bundle)); "
                f"{type(defense).__name__} has no {', '.join(missing)}"
            )
        self.steps = check_int(steps, "steps", 1)
        self.alpha = 2.5 * self.eps / self.steps if alpha is None else check_positive(alpha, "alpha")
        self.restarts = check_int(restarts, "restarts", 1)
        self.lam = check_positive(lam, "lam", allow_zero=True)
        self.margin = check_positive(margin, "margin", allow_zero=True)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))}, got {loss!r}")
        self.loss = loss
        if isinstance(bpda, bool):
            bpda = "mapper" if bpda else "none"
        if bpda not in BPDA_MODES:
            raise ValueError(f"bpda must be True, False or one of {', '.join(map(repr, BPDA_MODES))}, got {bpda!r}")
        self.bpda = bpda
        if not isinstance(random_start, bool):
            raise ValueError(f"random_start must be True or False, got {random_start!r}")
        if self.restarts > 1 and not random_start:
            raise ValueError(f"restarts={restarts} needs random_start=True (without it every restart is the same run)")
        self.random_start = random_start
        self.seed = check_seed(seed)
        # Evade every detector the defense deploys (all three for the full defense; a baseline's
        # spec may deploy fewer) — and none when they are not all calibrated (nothing is flagged).
        thresholds = defense.thresholds
        deployed = tuple(getattr(defense, "detectors", SCORES))
        self.thresholds = ({s: float(thresholds[s]) for s in deployed}
                           if deployed and all(s in thresholds for s in deployed) else {})
        bad = {s: t for s, t in self.thresholds.items() if not t > 0}
        if bad:
            raise ValueError(f"detector thresholds must be > 0 to be evaded, got {bad}: calibrate the bundle first")

    @property
    def defense(self) -> Defense:
        return self.model  # type: ignore[return-value]

    def _options(self) -> dict[str, Any]:
        return {"eps": self.eps, "steps": self.steps, "alpha": self.alpha, "restarts": self.restarts,
                "lam": self.lam, "bpda": self.bpda, "random_start": self.random_start, "seed": self.seed,
                "margin": self.margin, "loss": self.loss}

    def _forward(self, x: Tensor) -> DefenseOutput:
        if self.bpda == "none":
            return self.defense(x)
        return _SurrogateDefense(self.defense, self.bpda)(x)

    def objective(self, out: DefenseOutput, y: Tensor) -> Tensor:
        """Per-sample loss the attack ascends: classification loss minus the detector-evasion term."""
        if self.loss == "ce":
            loss = F.cross_entropy(out.logits, y, reduction="none")
        else:
            loss = (-margin_loss(out.logits, y)).clamp(max=0.0)
        if self.thresholds and self.lam > 0:
            scores = out.scores()
            excess = sum(F.relu((scores[s] - t) / t + self.margin) for s, t in self.thresholds.items())
            loss = loss - self.lam * excess
        return loss

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        gen = make_generator(self.seed, x.device)
        best = x.clone()
        rank = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)

        def keep(cand: Tensor, out: DefenseOutput) -> None:
            evades = ~out.flagged.detach()
            new = evades.long() + (evades & (out.label.detach() != y)).long()
            take = (new > rank) | ((new == rank) & (rank < 2))
            best.copy_(torch.where(take.view(-1, 1, 1, 1), cand.detach(), best))
            rank.copy_(torch.where(take, new, rank))

        runs: list[Tensor | None] = [self._start] if self._start is not None else []
        runs += [None] * self.restarts
        for first in runs:
            if first is not None:
                x_adv = first
            else:
                x_adv = random_start(x, self.eps, gen) if self.random_start else x.clone()
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                out = self._forward(x_adv)
                keep(x_adv, out)
                if bool((rank == 2).all()):
                    return best
                grad = input_gradient(self.objective(out, y).sum(), x_adv)
                x_adv = project(x_adv.detach() + self.alpha * grad.sign(), x, self.eps)
            with torch.no_grad():
                keep(x_adv, self.defense(x_adv))
            if bool((rank == 2).all()):
                break
        return best
