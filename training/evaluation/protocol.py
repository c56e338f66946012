"""The evaluation protocol of SPEC §3: threat models, attacks, ε levels and metrics.

For every (threat model, attack, ε) cell, on the same clean inputs:

* ``source_accuracy``: accuracy of the model the attack was crafted against (sanity: it drops);
* ``classifier_accuracy``: the deployed classifier C alone on the adversarial inputs;
* ``accuracy``: the full defense's label (argmax C(x̂)) on the adversarial inputs;
* ``detection_rate``: fraction of adversarial inputs flagged by any detector;
* ``defended_accuracy``: flagged or correctly classified (MagNet's convention) — always reported
  next to plain accuracy, never instead of it.

Clean inputs give clean accuracy and each detector's false-positive rate. Threat models:
``oblivious`` (crafted against an undefended classifier trained by the same recipe, then fed to
the defense), ``known`` (crafted against the deployed C; the attacker ignores M, P and the
detectors) and ``adaptive`` (through the whole defense; see ``training.attacks.AdaptiveAttack``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from ism_edge.errors import IsmEdgeError
from training.attacks import make_attack
from training.bundle import DefenseBundle
from training.data import ImageArrays
from training.data.torch_utils import iterate_batches
from training.defense import Defense, attack_surrogate

DEFAULT_EPS = (8 / 255, 0.1, 0.2, 0.3, 0.4)


class ThreatModel(str, Enum):
    OBLIVIOUS = "oblivious"
    KNOWN = "known"
    ADAPTIVE = "adaptive"


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate; ε is an L∞ budget on the [0, 1] pixel scale."""

    attacks: tuple[str, ...] = ("fgsm", "pgd")
    eps: tuple[float, ...] = DEFAULT_EPS
    threats: tuple[str, ...] = ("oblivious", "known")
    n: int | None = 1000
    batch_size: int = 200
    pgd_steps: int = 20
    pgd_restarts: int = 1
    adaptive_steps: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [a for a in self.attacks if a not in ("fgsm", "pgd", "square")]
        if bad or not self.attacks:
            raise ValueError(f"attacks must be a non-empty subset of fgsm, pgd, square; got {list(self.attacks)}")
        bad = [t for t in self.threats if t not in {m.value for m in ThreatModel}]
        if bad or not self.threats:
            raise ValueError(f"threats must be a non-empty subset of oblivious, known, adaptive; got {list(self.threats)}")
        if any(not 0.0 <= e <= 1.0 for e in self.eps) or not self.eps:
            raise ValueError("every ε must be in [0, 1] (pixels are on the [0, 1] scale)")
        if self.n is not None and self.n < 1:
            raise ValueError("n must be >= 1")
        if self.pgd_steps < 1 or self.pgd_restarts < 1 or self.batch_size < 1:
            raise ValueError("pgd_steps, pgd_restarts and batch_size must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _attack_kwargs(name: str, cfg: EvalConfig) -> dict[str, Any]:
    if name == "pgd":
        return {"steps": cfg.pgd_steps, "restarts": cfg.pgd_restarts, "seed": cfg.seed}
    return {}


def source_model(bundle: DefenseBundle, threat: str) -> torch.nn.Module:
    """The network an oblivious / known-classifier attacker differentiates."""
    if threat == ThreatModel.OBLIVIOUS:
        if "undefended" not in bundle.networks:
            raise IsmEdgeError("the oblivious threat model needs the bundle's undefended classifier: "
                               "train with the 'undefended' stage (ism-edge train --stages undefended --out BUNDLE)")
        return bundle.networks["undefended"]
    return attack_surrogate(bundle, "classifier")


def craft(bundle: DefenseBundle, defense: Defense, threat: str, attack: str, eps: float,
          x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig) -> torch.Tensor:
    """Adversarial examples for one batch under ``threat``."""
    if eps == 0.0:
        return x.clone()
    if threat == ThreatModel.ADAPTIVE:
        from training.attacks import AdaptiveAttack

        return AdaptiveAttack(defense, eps, steps=cfg.adaptive_steps, restarts=cfg.pgd_restarts, seed=cfg.seed)(x, y)
    return make_attack(attack, source_model(bundle, threat), eps, **_attack_kwargs(attack, cfg))(x, y)


@dataclass
class _Acc:
    n: int = 0
    src: int = 0
    clf: int = 0
    acc: int = 0
    det: int = 0
    dfd: int = 0

    def rates(self) -> dict[str, float]:
        d = max(self.n, 1)
        return {"source_accuracy": self.src / d, "classifier_accuracy": self.clf / d, "accuracy": self.acc / d,
                "detection_rate": self.det / d, "defended_accuracy": self.dfd / d, "n": self.n}


def evaluate_bundle(
    bundle: DefenseBundle,
    data: ImageArrays,
    cfg: EvalConfig,
    *,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the protocol on ``data`` and return a JSON-serialisable result (see module docstring)."""
    if not bundle.calibrated:
        raise IsmEdgeError("the bundle has no calibrated thresholds: run the 'calibrate' stage first")
    device = torch.device(device)
    bundle.to(device).eval()
    if cfg.n is not None and cfg.n < len(data):
        data = data.subset(np.sort(np.random.default_rng(cfg.seed).permutation(len(data))[: cfg.n]))
    defense = Defense(bundle).eval()
    cells = [(t, a, e) for t in cfg.threats for a in (cfg.attacks if t != "adaptive" else ("pgd",)) for e in cfg.eps]
    accs = {c: _Acc() for c in cells}
    clean = {"n": 0, "accuracy": 0, "classifier_accuracy": 0, "undefended_accuracy": 0,
             "fp": {"recon_error": 0, "jsd": 0, "p_score": 0, "any": 0}}
    n_batches = -(-len(data) // cfg.batch_size)
    task = progress.add_task("evaluate", total=n_batches * (1 + len(cells)), metrics="") if progress else None
    t0 = time.perf_counter()
    for x, y in iterate_batches(data, cfg.batch_size, shuffle=False, device=device):
        with torch.no_grad():
            o = defense(x)
            clean["n"] += len(y)
            clean["accuracy"] += int((o.label == y).sum())
            clean["classifier_accuracy"] += int((o.logits_raw.argmax(1) == y).sum())
            if "undefended" in bundle.networks:
                clean["undefended_accuracy"] += int((bundle.networks["undefended"](x).argmax(1) == y).sum())
            for k, v in o.scores().items():
                clean["fp"][k] += int((v > bundle.thresholds[k]).sum())
            clean["fp"]["any"] += int(o.flagged.sum())
        if progress is not None and task is not None:
            progress.advance(task)
        for cell in cells:
            threat, attack, eps = cell
            x_adv = craft(bundle, defense, threat, attack, eps, x, y, cfg)
            with torch.no_grad():
                o = defense(x_adv)
                src = source_model(bundle, threat) if threat != "adaptive" else None
                a = accs[cell]
                a.n += len(y)
                a.src += int(((src(x_adv) if src is not None else o.logits).argmax(1) == y).sum())
                a.clf += int((o.logits_raw.argmax(1) == y).sum())
                correct = o.label == y
                a.acc += int(correct.sum())
                a.det += int(o.flagged.sum())
                a.dfd += int((correct | o.flagged).sum())
            if progress is not None and task is not None:
                progress.update(task, advance=1, metrics=f"{threat} {attack} ε={eps:.3g}")
    n = max(clean["n"], 1)
    result = {
        "n": clean["n"],
        "config": cfg.to_dict(),
        "clean": {
            "accuracy": clean["accuracy"] / n,
            "classifier_accuracy": clean["classifier_accuracy"] / n,
            "undefended_accuracy": clean["undefended_accuracy"] / n if "undefended" in bundle.networks else None,
            "fpr": {k: v / n for k, v in clean["fp"].items()},
        },
        "cells": [{"threat": t, "attack": a, "eps": e, **accs[(t, a, e)].rates()} for (t, a, e) in cells],
        "thresholds": dict(bundle.thresholds),
        "target_fpr": bundle.target_fpr,
        "data": data.provenance,
        "wall_s": round(time.perf_counter() - t0, 1),
        "device": str(device),
    }
    if progress is not None and task is not None:
        progress.remove_task(task)
    return result
