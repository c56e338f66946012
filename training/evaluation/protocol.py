"""The evaluation protocol (docs/evaluation.md): threat models, attacks, ε levels and metrics.

For every (threat model, attack, ε) cell, on the same clean inputs:

* ``source_accuracy``: accuracy of the model the attack was crafted against (sanity: it drops);
  under the adaptive threat that model is the defense itself, so it equals ``accuracy``;
* ``classifier_accuracy``: the deployed classifier C alone on the adversarial inputs;
* ``accuracy``: the defense's label as deployed: with ``label_source="auto"`` argmax C(x) unless a
  detector fires, then argmax C(x̂); with ``"reformed"`` always argmax C(x̂) (C(x) for a baseline
  without reformer); ``accuracy_other``: the same inputs labelled the other way;
* ``detection_rate``: fraction of adversarial inputs flagged by any deployed detector
  (``detected_by`` per detector);
* ``defended_accuracy``: flagged or correctly classified (MagNet's convention) — always reported
  next to plain accuracy, never instead of it.

Clean inputs give clean accuracy and each detector's false-positive rate. Threat models:

* ``oblivious``: crafted against an undefended classifier trained by the same recipe (the
  bundle's ``undefended`` network), then fed to the defense (MagNet's own evaluation);
* ``known``: crafted against the deployed C (``logits / T`` when distilled); the attacker
  ignores M, P and the detectors;
* ``adaptive``: white-box through the whole deployed defense — M with its feedback loop, C on
  x̂, P and every deployed detector, with a term that pushes each score under its calibrated
  threshold (Carlini & Wagner 2017's break of MagNet; Tramèr et al. 2020). ``pgd`` is
  :class:`ism_edge_training.attacks.AdaptiveAttack` with ``adaptive_steps`` steps and
  ``adaptive_restarts`` restarts plus, for every ε above the smallest, one run started from the
  adversarial examples of the next smaller ε (they lie inside the larger ball, so a larger budget
  is never weaker; oblivious/known PGD does the same for the samples its own runs did not fool),
  ``fgsm`` its single step of size ε without random start,
  ``square`` the score-based black-box Square attack on the defense's label logits.

With ``sanity=True`` extra cells are run for the checks of :mod:`ism_edge_training.evaluation.sanity`
(ε = 0, an unbounded ε = 1, twice the PGD steps); they are reported apart from the table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from ism_edge.errors import IsmEdgeError
from ism_edge_training.attacks import PGD, AdaptiveAttack, Attack, make_attack
from ism_edge_training.bundle import SCORES, DefenseBundle
from ism_edge_training.data import ImageArrays
from ism_edge_training.data.torch_utils import iterate_batches
from ism_edge_training.defense import Defense, attack_surrogate, is_distilled

DEFAULT_EPS = (8 / 255, 0.1, 0.2, 0.3, 0.4)
ATTACK_NAMES = ("fgsm", "pgd", "square")
UNBOUNDED_EPS = 1.0


class ThreatModel(str, Enum):
    OBLIVIOUS = "oblivious"
    KNOWN = "known"
    ADAPTIVE = "adaptive"


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate; ε is an L∞ budget on the [0, 1] pixel scale.

    ``pgd_steps``/``pgd_restarts``: PGD against a classifier (oblivious, known; step 2.5·ε/steps,
    random start). ``adaptive_steps``/``adaptive_restarts``: the adaptive PGD through the defense;
    ``adaptive_bpda``: ``"none"`` (exact gradients), ``"feedback"`` or ``"mapper"`` (see
    :class:`ism_edge_training.attacks.AdaptiveAttack`). ``square_queries``: Square's query budget per image.
    ``sanity``: also run the extra cells of the sanity checks. ``adaptive_eps``: the adaptive
    threat's budgets when they differ from ``eps`` (None: the same); its attacks cost one pass
    through the whole defense per step, so a long evaluation may run them at 8/255 only.
    """

    attacks: tuple[str, ...] = ("fgsm", "pgd")
    eps: tuple[float, ...] = DEFAULT_EPS
    threats: tuple[str, ...] = ("oblivious", "known", "adaptive")
    n: int | None = 100
    batch_size: int = 200
    pgd_steps: int = 20
    pgd_restarts: int = 1
    adaptive_steps: int = 50
    adaptive_restarts: int = 1
    adaptive_bpda: str = "none"
    square_queries: int = 1000
    sanity: bool = True
    seed: int = 0
    adaptive_eps: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        bad = [a for a in self.attacks if a not in ATTACK_NAMES]
        if bad or not self.attacks or len(set(self.attacks)) != len(self.attacks):
            raise ValueError(
                f"attacks must be a non-empty subset of {', '.join(ATTACK_NAMES)}; got {list(self.attacks)}")
        bad = [t for t in self.threats if t not in {m.value for m in ThreatModel}]
        if bad or not self.threats or len(set(self.threats)) != len(self.threats):
            raise ValueError(
                f"threats must be a non-empty subset of oblivious, known, adaptive; got {list(self.threats)}")
        for eps in (self.eps, self.adaptive_eps):
            if eps is not None and (not eps or any(not 0.0 <= e <= 1.0 for e in eps)):
                raise ValueError("every ε must be in [0, 1] (pixels are on the [0, 1] scale)")
        if self.n is not None and self.n < 1:
            raise ValueError("n must be >= 1")
        for name in ("pgd_steps", "pgd_restarts", "batch_size", "adaptive_steps", "adaptive_restarts",
                     "square_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.adaptive_bpda not in ("none", "feedback", "mapper"):
            raise ValueError(f"adaptive_bpda must be none, feedback or mapper; got {self.adaptive_bpda!r}")

    def to_dict(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if self.adaptive_eps is None:
            del d["adaptive_eps"]  # reports written before the option compare equal
        return d

    def eps_for(self, threat: str) -> tuple[float, ...]:
        """The budgets evaluated under ``threat``."""
        return self.adaptive_eps if threat == ThreatModel.ADAPTIVE and self.adaptive_eps is not None else self.eps

    def sanity_eps_for(self, threat: str) -> float:
        """The budget of the more-steps check: 8/255 when evaluated, else the smallest ε > 0."""
        positive = sorted(e for e in self.eps_for(threat) if e > 0)
        if any(abs(e - 8 / 255) < 1e-9 for e in positive):
            return 8 / 255
        return positive[0] if positive else 8 / 255


@dataclass(frozen=True)
class Cell:
    """One (threat, attack, ε) evaluation; ``steps_factor`` > 1 only for the more-steps check."""

    threat: str
    attack: str
    eps: float
    steps_factor: int = 1
    sanity: bool = False

    def key(self) -> dict[str, Any]:
        d: dict[str, Any] = {"threat": self.threat, "attack": self.attack, "eps": self.eps}
        if self.steps_factor != 1:
            d["steps_factor"] = self.steps_factor
        return d


def plan_cells(cfg: EvalConfig) -> tuple[list[Cell], list[Cell]]:
    """The table's cells and the extra sanity cells (ε = 0, unbounded ε, more steps)."""
    main = [Cell(t, a, e) for t in cfg.threats for a in cfg.attacks for e in cfg.eps_for(t)]
    extra: list[Cell] = []
    if cfg.sanity:
        for t in cfg.threats:
            if not any(e == 0.0 for e in cfg.eps_for(t)):
                extra.append(Cell(t, "fgsm", 0.0, sanity=True))
            if not any(e == UNBOUNDED_EPS for e in cfg.eps_for(t)) or "pgd" not in cfg.attacks:
                extra.append(Cell(t, "pgd", UNBOUNDED_EPS, sanity=True))
            if t in ("known", "adaptive"):
                extra.append(Cell(t, "pgd", cfg.sanity_eps_for(t), steps_factor=2, sanity=True))
    return main, extra


class DefenseLabelLogits(nn.Module):
    """The defense's label logits as a classifier (what a score-based black-box attacker queries)."""

    def __init__(self, defense: Defense) -> None:
        super().__init__()
        self.defense = defense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.defense(x).logits


def source_model(bundle: DefenseBundle, threat: str) -> nn.Module:
    """The network an oblivious / known-classifier attacker differentiates."""
    if threat == ThreatModel.OBLIVIOUS:
        if "undefended" not in bundle.networks:
            raise IsmEdgeError("the oblivious threat model needs the bundle's undefended classifier: "
                               "train with the 'undefended' stage (ism-edge train --stages undefended --out BUNDLE)")
        return bundle.networks["undefended"]
    return attack_surrogate(bundle, "classifier")


def make_cell_attack(bundle: DefenseBundle, defense: Defense, cell: Cell, cfg: EvalConfig) -> Attack:
    """The attack object of one cell (see the module docstring for each threat model)."""
    if cell.threat == ThreatModel.ADAPTIVE:
        bpda = cfg.adaptive_bpda if defense.mapper is not None else "none"
        if cell.attack == "fgsm":
            return AdaptiveAttack(defense, cell.eps, steps=1, alpha=max(cell.eps, 1e-12), random_start=False,
                                         bpda=bpda)
        if cell.attack == "pgd":
            return AdaptiveAttack(defense, cell.eps, steps=cfg.adaptive_steps * cell.steps_factor,
                                         restarts=cfg.adaptive_restarts, bpda=bpda, seed=cfg.seed)
        return make_attack("square", DefenseLabelLogits(defense), cell.eps, n_queries=cfg.square_queries, seed=cfg.seed)
    model = source_model(bundle, cell.threat)
    if cell.attack == "pgd":
        kw: dict[str, Any] = {"steps": cfg.pgd_steps * cell.steps_factor, "restarts": cfg.pgd_restarts,
                              "seed": cfg.seed}
    elif cell.attack == "square":
        kw = {"n_queries": cfg.square_queries, "seed": cfg.seed}
    else:
        kw = {}
    return make_attack(cell.attack, model, cell.eps, **kw)


def craft(bundle: DefenseBundle, defense: Defense, threat: str, attack: str, eps: float,
          x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig) -> torch.Tensor:
    """Adversarial examples for one batch under ``threat`` (ε = 0 runs the attack too)."""
    return make_cell_attack(bundle, defense, Cell(threat, attack, eps), cfg)(x, y)


@dataclass
class _Acc:
    n: int = 0
    src: int = 0
    clf: int = 0
    acc: int = 0
    other: int = 0
    det: int = 0
    dfd: int = 0
    by: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SCORES, 0))
    wall: float = 0.0
    attack: str = ""

    def rates(self) -> dict[str, Any]:
        d = max(self.n, 1)
        return {"source_accuracy": self.src / d, "classifier_accuracy": self.clf / d, "accuracy": self.acc / d,
                "accuracy_other": self.other / d, "detection_rate": self.det / d, "defended_accuracy": self.dfd / d,
                "n": self.n,
                "detected_by": {k: v / d for k, v in self.by.items()}, "wall_s": round(self.wall, 2),
                "attack_options": self.attack}


def _other_label(o: Any, label_source: str) -> torch.Tensor:
    """The label the defense would give with the label source it does not use."""
    if label_source == "auto":
        return o.logits_reformed.argmax(1)
    return torch.where(o.flagged.view(-1, 1), o.logits_reformed, o.logits_raw).argmax(1)


def _dataset_name(data: ImageArrays) -> str:
    from ism_edge_training.data.cifar10 import CIFAR10_CLASSES

    names = tuple(data.class_names)
    if names == tuple(CIFAR10_CLASSES):
        return "cifar10"
    if data.provenance.get("kind") == "celeba" or (len(names) == 2 and names[0] == f"not_{names[1]}"):
        return "celeba"
    return "custom"


def evaluate_bundle(
    bundle: DefenseBundle,
    data: ImageArrays,
    cfg: EvalConfig,
    *,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    name: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the protocol on ``data`` and return a JSON-serialisable result (see module docstring).

    ``data`` is reduced to a fixed random subset of ``cfg.n`` images chosen with ``cfg.seed``, so
    every bundle evaluated with the same config sees the same inputs. ``name`` labels the
    defense in reports (default: the bundle's baseline name). ``echo``, when given, gets one line
    per finished cell and batch (for logs, where no progress bar is drawn).
    """
    if not bundle.calibrated:
        raise IsmEdgeError("the bundle has no calibrated thresholds: run the 'calibrate' stage first")
    device = torch.device(device)
    bundle.to(device).eval()
    if cfg.n is not None and cfg.n < len(data):
        data = data.subset(np.sort(np.random.default_rng(cfg.seed).permutation(len(data))[: cfg.n]))
    defense = Defense(bundle).eval()
    main, extra = plan_cells(cfg)
    cells = main + extra
    accs = {c: _Acc() for c in cells}
    clean: dict[str, Any] = {"n": 0, "accuracy": 0, "accuracy_other": 0, "classifier_accuracy": 0,
                             "undefended_accuracy": 0, "fp": {**dict.fromkeys(SCORES, 0), "any": 0}}
    n_batches = -(-len(data) // cfg.batch_size)
    label = name or bundle.defense.baseline
    task = progress.add_task(f"evaluate {label}", total=n_batches * (1 + len(cells)), metrics="") if progress else None
    t0 = time.perf_counter()
    for i_batch, (x, y) in enumerate(iterate_batches(data, cfg.batch_size, shuffle=False, device=device), 1):
        with torch.no_grad():
            o = defense(x)
            clean["n"] += len(y)
            clean["accuracy"] += int((o.label == y).sum())
            clean["accuracy_other"] += int((_other_label(o, defense.label_source) == y).sum())
            clean["classifier_accuracy"] += int((o.logits_raw.argmax(1) == y).sum())
            if "undefended" in bundle.networks:
                clean["undefended_accuracy"] += int((bundle.networks["undefended"](x).argmax(1) == y).sum())
            for k, v in o.scores().items():
                if k in defense.thresholds:
                    clean["fp"][k] += int((v > defense.thresholds[k]).sum())
            clean["fp"]["any"] += int(o.flagged.sum())
        if progress is not None and task is not None:
            progress.advance(task)
        found: dict[str, dict[float, torch.Tensor]] = {}  # adaptive PGD examples of this batch, by threat and ε
        for cell in sorted(cells, key=lambda c: (c.threat, c.attack, c.steps_factor, c.eps)):
            if progress is not None and task is not None:
                progress.update(task, metrics=f"{cell.threat} {cell.attack} ε={cell.eps:.3g}"
                                + (f" ×{cell.steps_factor} steps" if cell.steps_factor > 1 else ""))
            a = accs[cell]
            t_cell = time.perf_counter()
            attack = make_cell_attack(bundle, defense, cell, cfg)
            if isinstance(attack, (AdaptiveAttack, PGD)) and cell.attack == "pgd" and cell.steps_factor == 1:
                # Nested budgets: one run starts from the examples of the largest smaller ε (inside
                # this ball): adaptive PGD scores every iterate, so a larger budget is never weaker;
                # PGD adds the run for the samples its random-start runs did not fool. The
                # more-steps check runs without.
                smaller = [e for e in found.get(cell.threat, {}) if e < cell.eps]
                x_adv = attack(x, y, start=found[cell.threat][max(smaller)] if smaller else None)
                found.setdefault(cell.threat, {})[cell.eps] = x_adv
            else:
                x_adv = attack(x, y)
            with torch.no_grad():
                o = defense(x_adv)
                src = o.logits if cell.threat == ThreatModel.ADAPTIVE else source_model(bundle, cell.threat)(x_adv)
                a.n += len(y)
                a.src += int((src.argmax(1) == y).sum())
                a.clf += int((o.logits_raw.argmax(1) == y).sum())
                correct = o.label == y
                a.acc += int(correct.sum())
                a.other += int((_other_label(o, defense.label_source) == y).sum())
                a.det += int(o.flagged.sum())
                a.dfd += int((correct | o.flagged).sum())
                for k, v in o.scores().items():
                    if k in defense.thresholds:
                        a.by[k] += int((v > defense.thresholds[k]).sum())
            a.wall += time.perf_counter() - t_cell
            a.attack = repr(attack)
            if echo is not None:
                echo(f"evaluate {label}: batch {i_batch}/{n_batches} {cell.threat} {cell.attack} ε={cell.eps:.3g}"
                     + (f" ×{cell.steps_factor} steps" if cell.steps_factor > 1 else "")
                     + f": {int(correct.sum())}/{len(y)} correct, {int(o.flagged.sum())} flagged "
                     f"({time.perf_counter() - t_cell:.0f} s; {time.perf_counter() - t0:.0f} s in all)")
            if progress is not None and task is not None:
                progress.advance(task)
    n = max(clean["n"], 1)
    result = {
        "name": label,
        "defense": bundle.defense.to_dict(),
        "dataset": _dataset_name(data),
        "num_classes": len(bundle.class_names),
        "n": clean["n"],
        "config": cfg.to_dict(),
        "clean": {
            "accuracy": clean["accuracy"] / n,
            "accuracy_other": clean["accuracy_other"] / n,
            "classifier_accuracy": clean["classifier_accuracy"] / n,
            "undefended_accuracy": clean["undefended_accuracy"] / n if "undefended" in bundle.networks else None,
            "fpr": {k: (v / n if k == "any" or k in defense.thresholds else None) for k, v in clean["fp"].items()},
        },
        "cells": [{**c.key(), **accs[c].rates()} for c in main],
        "sanity_cells": [{**c.key(), **accs[c].rates()} for c in extra],
        "thresholds": dict(defense.thresholds),
        "label_source": defense.label_source,
        "target_fpr": bundle.target_fpr,
        "distilled": is_distilled(bundle),
        "data": data.provenance,
        "wall_s": round(time.perf_counter() - t0, 1),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    from ism_edge_training.evaluation.sanity import sanity_checks

    result["sanity"] = sanity_checks(result)
    if progress is not None and task is not None:
        progress.remove_task(task)
    return result
