"""Sanity checks of an evaluation (Carlini et al. 2019, "On Evaluating Adversarial Robustness").

Each check compares cells of one result on the same inputs and reports ``passed`` (True, False,
or None when the cells it needs were not run) with a one-line ``detail``. The metric an attack is
judged by is the one it optimises: the accuracy of the attacked model for the oblivious and
known-classifier threats, the defended accuracy (flagged or correct) for the adaptive threat.
Differences smaller than the tolerance ``max(0.02, 3/n)`` are sampling noise of the attacks'
random starts, not failures.

Monotonicity in ε is checked for PGD only: a single FGSM step can overshoot at large ε, an
adaptive attack keeps its best unflagged iterate (the clean input when every step is flagged), and
the adaptive Square attack does not see the detectors, so their curves need not be monotone.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ism_edge_training.evaluation.report import eps_label

UNBOUNDED_MAX = 0.05


def target_metric(threat: str) -> str:
    """The metric the attacks of ``threat`` minimise."""
    return "defended_accuracy" if threat == "adaptive" else "source_accuracy"


def tolerance(n: int) -> float:
    return max(0.02, 3.0 / max(n, 1))


def _check(name: str, passed: bool | None, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": passed, "detail": detail}


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


Cells = dict[tuple[str, str, float], dict[str, Any]]


def _pairs(plain: list[dict[str, Any]], by_key: Cells, attack: str,
           other: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(cell of ``attack``, cell of ``other`` at the same threat and ε) for every ε > 0 where both ran."""
    out = []
    for c in plain:
        o = by_key.get((c["threat"], other, round(c["eps"], 9)))
        if c["attack"] == attack and c["eps"] > 0 and o is not None:
            out.append((c, o))
    return out


def sanity_checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The checks of the module docstring for one bundle's ``result`` (see ``evaluate_bundle``)."""
    n = int(result["n"])
    tol = tolerance(n)
    cells = result["cells"] + result.get("sanity_cells", [])
    plain = [c for c in cells if c.get("steps_factor", 1) == 1]
    by_key = {(c["threat"], c["attack"], round(c["eps"], 9)): c for c in plain}
    checks = []

    zero = [c for c in plain if c["eps"] == 0.0]
    clean = result["clean"]
    bad = [f"{c['threat']}/{c['attack']}: {_pct(c['accuracy'])} vs {_pct(clean['accuracy'])}"
           for c in zero if abs(c["accuracy"] - clean["accuracy"]) > 1e-9
           or abs(c["detection_rate"] - clean["fpr"]["any"]) > 1e-9]
    checks.append(_check("ε = 0 equals clean accuracy", None if not zero else not bad,
                         "no ε = 0 cell" if not zero else "; ".join(bad) if bad
                         else f"{len(zero)} cells equal clean accuracy {_pct(clean['accuracy'])} "
                              f"and FPR {_pct(clean['fpr']['any'])}"))

    series: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for c in plain:
        if c["attack"] == "pgd" or c["eps"] == 0.0:
            series[(c["threat"], "pgd")].append(c)
    bad = []
    for (threat, attack), cs in series.items():
        m = target_metric(threat)
        cs = sorted(cs, key=lambda c: c["eps"])
        for lo, hi in zip(cs, cs[1:], strict=False):
            if hi[m] > lo[m] + tol:
                bad.append(f"{threat}/{attack} {m} {_pct(lo[m])} at ε={eps_label(lo['eps'])} → "
                           f"{_pct(hi[m])} at ε={eps_label(hi['eps'])}")
    checks.append(_check("PGD: accuracy falls as ε grows", not bad if series else None,
                         "; ".join(bad) if bad else f"{len(series)} series non-increasing (tolerance {_pct(tol)})"))

    unb = [c for c in plain if c["eps"] >= 1.0 and c["attack"] == "pgd"]
    bad = [f"{c['threat']}: {target_metric(c['threat'])} {_pct(c[target_metric(c['threat'])])}"
           for c in unb if c[target_metric(c["threat"])] > UNBOUNDED_MAX]
    checks.append(_check("unbounded ε (= 1) reaches ~0 %", None if not unb else not bad,
                         "no ε = 1 PGD cell" if not unb else "; ".join(bad) if bad else
                         ", ".join(f"{c['threat']} {_pct(c[target_metric(c['threat'])])}" for c in unb)))

    pairs = _pairs(plain, by_key, "pgd", "fgsm")
    bad = [f"{p['threat']} ε={eps_label(p['eps'])}: PGD {_pct(p[target_metric(p['threat'])])} > "
           f"FGSM {_pct(f[target_metric(p['threat'])])}"
           for p, f in pairs if p[target_metric(p["threat"])] > f[target_metric(p["threat"])] + tol]
    checks.append(_check("PGD at least as strong as FGSM", None if not pairs else not bad,
                         "no PGD/FGSM pair" if not pairs else "; ".join(bad) if bad else f"{len(pairs)} pairs"))

    more = [c for c in cells if c.get("steps_factor", 1) > 1]
    rows = []
    bad = []
    for c in more:
        base = by_key.get((c["threat"], c["attack"], round(c["eps"], 9)))
        if base is None:
            continue
        m = target_metric(c["threat"])
        rows.append(f"{c['threat']} ε={eps_label(c['eps'])}: {_pct(base[m])} → {_pct(c[m])} "
                    f"with ×{c['steps_factor']} steps")
        if c[m] > base[m] + tol:
            bad.append(rows[-1])
    checks.append(_check("more steps never help the defense", None if not rows else not bad,
                         "no more-steps cell" if not rows else "; ".join(bad or rows)))

    pairs = _pairs(plain, by_key, "square", "pgd")
    bad = [f"{s['threat']} ε={eps_label(s['eps'])}: Square {_pct(s[target_metric(s['threat'])])} < "
           f"PGD {_pct(p[target_metric(s['threat'])])}"
           for s, p in pairs if s[target_metric(s["threat"])] < p[target_metric(s["threat"])] - tol]
    checks.append(_check("Square (black-box) does not beat white-box PGD", None if not pairs else not bad,
                         "Square not run (add it to --attacks)" if not pairs
                         else "; ".join(bad) if bad else f"{len(pairs)} pairs"))

    rows = []
    bad = []
    for c in plain:
        if c["threat"] != "adaptive" or c["attack"] != "pgd" or c["eps"] <= 0:
            continue
        others = [by_key[k] for k in ((t, "pgd", round(c["eps"], 9)) for t in ("oblivious", "known")) if k in by_key]
        if not others:
            continue
        best = min(o["defended_accuracy"] for o in others)
        rows.append(c)
        if c["defended_accuracy"] > best + tol:
            bad.append(f"ε={eps_label(c['eps'])}: adaptive {_pct(c['defended_accuracy'])} > {_pct(best)}")
    checks.append(_check("adaptive PGD lowers defended accuracy at least as much as oblivious/known PGD",
                         None if not rows else not bad,
                         "needs adaptive and oblivious/known PGD cells" if not rows else "; ".join(bad) if bad
                         else f"{len(rows)} budgets"))
    return checks
