"""The paper's reported figures (``seed/paper.txt``), kept apart from anything we measure.

They are *claims*: the paper states neither the threat model nor the ε scale of Table 3 (nor
the attack), and its Table 4 names FGSM/PGD at "0.3" on CelebA without a threat model. Reports
print them in their own column, labelled as claims, next to our measurements.
"""

from __future__ import annotations

from typing import Any

# (dataset, defense baseline, attack or None = not stated, ε) -> accuracy as printed in the paper.
CLAIMS: dict[tuple[str, str, str | None, float], float] = {
    # Table 3, CIFAR-10, "attacking level" 0.2 / 0.3 / 0.4; attack and threat model not stated.
    ("cifar10", "none", None, 0.2): 0.482,
    ("cifar10", "none", None, 0.3): 0.374,
    ("cifar10", "none", None, 0.4): 0.268,
    ("cifar10", "full", None, 0.2): 0.936,
    ("cifar10", "full", None, 0.3): 0.894,
    ("cifar10", "full", None, 0.4): 0.871,
    ("cifar10", "magnet", None, 0.2): 0.792,
    ("cifar10", "magnet", None, 0.3): 0.688,
    ("cifar10", "magnet", None, 0.4): 0.564,
    # Table 4, CelebA (binary attribute not stated), 2,000 test images at up to 512×512.
    ("celeba", "none", "fgsm", 0.3): 0.624,
    ("celeba", "none", "pgd", 0.3): 0.597,
    ("celeba", "full", "fgsm", 0.3): 0.927,
    ("celeba", "full", "pgd", 0.3): 0.936,
}
# Rows of the paper's tables for defenses we do not train (for the reader's reference only).
OTHER_CLAIMS: dict[str, dict[str, dict[Any, float]]] = {
    "cifar10": {"DDSA [15]": {0.2: 0.895, 0.3: 0.853, 0.4: 0.816}},
    "celeba": {"CelebANet [16]": {("fgsm", 0.3): 0.912, ("pgd", 0.3): 0.923}},
}
SOURCE = {"cifar10": "paper Table 3 (attack and threat model not stated)",
          "celeba": "paper Table 4 (threat model not stated; 2,000 images at 512×512)"}


def claim_for(dataset: str, defense: str, attack: str, eps: float) -> float | None:
    """The paper's figure for this (dataset, defense, attack, ε), or None."""
    for att in (attack, None):
        for (d, b, a, e), v in CLAIMS.items():
            if d == dataset and b == defense and a == att and abs(e - eps) < 1e-9:
                return v
    return None


def claims_table(dataset: str) -> list[dict[str, Any]]:
    """Every claim for ``dataset`` as rows (defense, attack, ε, accuracy, source)."""
    rows = [{"defense": b, "attack": a or "not stated", "eps": e, "accuracy": v, "source": SOURCE[dataset]}
            for (d, b, a, e), v in CLAIMS.items() if d == dataset]
    for name, vals in OTHER_CLAIMS.get(dataset, {}).items():
        for k, v in vals.items():
            att, e = k if isinstance(k, tuple) else (None, k)
            rows.append({"defense": name, "attack": att or "not stated", "eps": e, "accuracy": v,
                         "source": SOURCE[dataset]})
    return rows
