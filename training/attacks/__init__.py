"""Adversarial attacks on [0, 1] NCHW pixels with L∞ budgets (docs/evaluation.md).

FGSM and PGD (white-box, against a logit-returning model), Square (score-based black-box) and
the white-box adaptive attack on the whole defense (PGD through M, C, P and the detectors, with
BPDA where needed). Every attack is called as ``attack(x, y)`` and returns x' with
‖x' − x‖∞ ≤ ε and x' ∈ [0, 1].
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ism_edge_training.attacks.adaptive import AdaptiveAttack
from ism_edge_training.attacks.base import BPDA, Attack, bpda, project
from ism_edge_training.attacks.fgsm import FGSM
from ism_edge_training.attacks.pgd import PGD
from ism_edge_training.attacks.square import SquareAttack

ATTACKS: dict[str, type[Attack]] = {"fgsm": FGSM, "pgd": PGD, "square": SquareAttack}


def make_attack(name: str, model: nn.Module, eps: float, **kw: Any) -> Attack:
    """Build an attack on a logit-returning ``model`` by name: ``"fgsm"``, ``"pgd"`` or ``"square"``.

    ``kw`` are the attack's keyword options (e.g. ``steps=20`` for PGD, ``n_queries=1000`` for
    Square); an option the attack does not take raises ``ValueError`` naming the allowed ones.
    The adaptive attack targets a whole defense: build it with ``AdaptiveAttack(Defense(bundle), eps)``.
    """
    key = name.lower().strip() if isinstance(name, str) else name
    if key not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}: choose one of {', '.join(ATTACKS)}")
    cls = ATTACKS[key]
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        opts = ", ".join(allowed) if allowed else "none"
        raise ValueError(f"attack {key!r} has no option {', '.join(unknown)}; its options: {opts}")
    return cls(model, eps, **kw)


__all__ = ["ATTACKS", "BPDA", "AdaptiveAttack", "Attack", "FGSM", "PGD", "SquareAttack", "bpda", "make_attack",
           "project"]
