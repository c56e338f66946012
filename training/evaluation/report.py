"""Render evaluation results: terminal table (rich), Markdown, CSV and a plot of accuracy vs ε.

Every function takes one bundle's result (``evaluate_bundle``) or a list of them (one per
defense, evaluated on the same inputs); the paper's figures appear only in the column labelled
as claims.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from rich.table import Table


def eps_label(eps: float) -> str:
    """``0.0313…`` → ``8/255``; other budgets as decimals."""
    f = Fraction(eps).limit_denominator(255)
    if f.denominator == 255 and abs(float(f) - eps) < 1e-9:
        return f"{f.numerator}/255"
    return f"{eps:g}"


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


COLUMNS = [
    ("defense", "defense"),
    ("threat", "threat"),
    ("attack", "attack"),
    ("eps", "ε"),
    ("source_accuracy", "attacked model acc %"),
    ("classifier_accuracy", "C alone acc %"),
    ("accuracy", "defense acc %"),
    ("accuracy_other", "other labels acc %"),
    ("detection_rate", "detected %"),
    ("defended_accuracy", "defended acc %"),
    ("claim", "paper claim % (unverified)"),
]
TEXT = ("defense", "threat", "attack")


def _as_list(results: dict[str, Any] | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [results] if isinstance(results, dict) else list(results)


def rows(results: dict[str, Any] | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per (defense, threat, attack, ε) cell, with the paper's claim where it has one."""
    from ism_edge_training.evaluation.claims import claim_for

    out = []
    for r in _as_list(results):
        for c in r["cells"]:
            out.append({"defense": r.get("name", r.get("defense", {}).get("baseline", "full")), **c,
                        "claim": claim_for(r.get("dataset", ""), r.get("defense", {}).get("baseline", "full"),
                                           c["attack"], c["eps"])})
    return out


def _cells(row: dict[str, Any]) -> list[str]:
    return [eps_label(row[k]) if k == "eps" else row[k] if k in TEXT else _pct(row.get(k)) for k, _ in COLUMNS]


def clean_summary(result: dict[str, Any]) -> str:
    c = result["clean"]
    fpr = c["fpr"]
    und = "" if c.get("undefended_accuracy") is None else f", undefended classifier {_pct(c['undefended_accuracy'])} %"
    dets = ", ".join(f"{k} {_pct(v)} %" for k, v in fpr.items() if k != "any" and v is not None) or "no detectors"
    src = result.get("label_source", "reformed")
    other = "reformed" if src == "auto" else "auto"
    alt = "" if c.get("accuracy_other") is None else f" ({other} labels: {_pct(c['accuracy_other'])} %)"
    return (f"{result.get('name', 'defense')}, clean ({result['n']} images): defense accuracy {_pct(c['accuracy'])} % "
            f"with {src} labels{alt}, "
            f"C alone {_pct(c['classifier_accuracy'])} %{und}; false-positive rate: {dets}, any {_pct(fpr['any'])} % "
            f"(target {_pct(result['target_fpr'])} % each)")


def rich_table(results: dict[str, Any] | Sequence[dict[str, Any]], title: str = "") -> Table:
    rs = _as_list(results)
    failed = [f"{r.get('name')}: {c['name']}" for r in rs for c in r.get("sanity", []) if c["passed"] is False]
    caption = "\n".join([clean_summary(r) for r in rs]
                        + ([f"[red]SANITY CHECK FAILED: {'; '.join(failed)}"] if failed else []))
    table = Table(title=title or None, caption=caption, caption_justify="left")
    for key, header in COLUMNS:
        table.add_column(header, justify="left" if key in TEXT else "right")
    for row in rows(rs):
        table.add_row(*_cells(row))
    return table


def _md(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(b) + " |" for b in body)]


def markdown_report(results: dict[str, Any] | Sequence[dict[str, Any]], title: str | None = None) -> str:
    """The full report: cells, clean accuracy and FPR, sanity checks, claims note, settings."""
    from ism_edge_training.evaluation.claims import SOURCE

    rs = _as_list(results)
    lines = [f"# {title}", ""] if title else []
    lines += _md([h for _, h in COLUMNS], [_cells(r) for r in rows(rs)])
    lines += ["", "Clean data (false-positive rates on the same clean images, "
                  "each detector calibrated for the target FPR):", ""]
    lines += _md(["defense", "n", "labels", "defense acc %", "other labels acc %", "C alone acc %", "undefended acc %",
                  "FPR recon %", "FPR JSD %", "FPR P %", "FPR any %"],
                 [[r.get("name", ""), str(r["n"]), r.get("label_source", "reformed"), _pct(r["clean"]["accuracy"]),
                   _pct(r["clean"].get("accuracy_other")), _pct(r["clean"]["classifier_accuracy"]),
                   _pct(r["clean"].get("undefended_accuracy")), _pct(r["clean"]["fpr"].get("recon_error")),
                   _pct(r["clean"]["fpr"].get("jsd")), _pct(r["clean"]["fpr"].get("p_score")),
                   _pct(r["clean"]["fpr"]["any"])]
                  for r in rs])
    lines += ["", "Sanity checks (on the same inputs; tolerance max(2 %, 3/n)):", ""]
    lines += _md(["defense", "check", "result", "detail"],
                 [[r.get("name", ""), c["name"], {True: "pass", False: "**FAIL**", None: "not run"}[c["passed"]],
                   c["detail"]]
                  for r in rs for c in r.get("sanity", [])])
    datasets = sorted({r.get("dataset", "") for r in rs} & set(SOURCE))
    if datasets:
        lines += ["", "Paper claims are copied from " + "; ".join(SOURCE[d] for d in datasets)
                  + ", next to the rows of the same defense and attack level; they are not our measurements."]
    cfg = rs[0]["config"] if rs else {}
    if cfg:
        lines += ["", f"Settings: n = {rs[0]['n']} images per cell; "
                  f"PGD {cfg['pgd_steps']} steps × {cfg['pgd_restarts']} restart(s) "
                  f"(step 2.5·ε/steps, random start); "
                  f"adaptive PGD {cfg['adaptive_steps']} steps × {cfg['adaptive_restarts']} restart(s), "
                  f"BPDA {cfg['adaptive_bpda']}; Square {cfg['square_queries']} queries; seed {cfg['seed']}; "
                  f"device {rs[0].get('device')}, {rs[0].get('torch_threads')} threads; wall time "
                  + ", ".join(f"{r.get('name')} {r['wall_s']:.0f} s" for r in rs) + "."]
    return "\n".join(lines) + "\n"


def markdown_table(result: dict[str, Any] | Sequence[dict[str, Any]]) -> str:
    """Alias of :func:`markdown_report` without a title."""
    return markdown_report(result)


CSV_FIELDS = ["defense", "baseline", "dataset", "threat", "attack", "eps", "steps_factor", "sanity", "n",
              "source_accuracy", "classifier_accuracy", "accuracy", "detection_rate", "defended_accuracy", "claim",
              "wall_s", "attack_options"]


def csv_text(results: dict[str, Any] | Sequence[dict[str, Any]]) -> str:
    """Every cell (table and sanity cells) as CSV, fractions in [0, 1]."""
    from ism_edge_training.evaluation.claims import claim_for

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in _as_list(results):
        base = r.get("defense", {}).get("baseline", "full")
        for sanity, cells in ((False, r["cells"]), (True, r.get("sanity_cells", []))):
            for c in cells:
                w.writerow({"defense": r.get("name"), "baseline": base, "dataset": r.get("dataset"), "sanity": sanity,
                            "steps_factor": c.get("steps_factor", 1), **c,
                            "claim": None if sanity else claim_for(r.get("dataset", ""), base, c["attack"], c["eps"])})
    return buf.getvalue()


#: Legend names of the evaluated defenses (their manifests' baseline names).
DEFENSE_NAMES = {"full": "ISM defense", "none": "no defense", "magnet": "MagNet",
                 "adv-only": "adversarial training only", "distill-only": "distillation only"}


def _ci95(p: float, n: int) -> float:
    """Half-width of the binomial 95 % interval (normal approximation) of a rate ``p`` over ``n`` images, in %."""
    return 100 * 1.96 * (p * (1 - p) / max(n, 1)) ** 0.5


def plot_accuracy_vs_eps(results: dict[str, Any] | Sequence[dict[str, Any]], path: str | Path) -> Path:
    """PNG, one column per threat model: the defense's accuracy with C alone beside it (top row),
    defended accuracy and detection rate (bottom row) vs ε, from ε = 0 (clean images) up.

    Colour = defense (named in the legend), line style = what is measured, marker = attack. Every
    point has its binomial 95 % error bar; the paper's claims are crosses; chance level is grey.
    In the oblivious column the undefended classifier's accuracy on its own attacks is drawn too.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ism_edge_training.evaluation.claims import claim_for

    rs = _as_list(results)
    threats = [t for t in ("oblivious", "known", "adaptive") if any(c["threat"] == t for r in rs for c in r["cells"])]
    markers = {"fgsm": "s", "pgd": "o", "square": "^"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, len(threats), figsize=(4.6 * len(threats), 7.5), squeeze=False, sharex=True,
                             sharey=True)

    def curve(ax: Any, pts: list[tuple[float, float, int]], fmt: str, color: str, label: str, **kw: Any) -> None:
        ax.errorbar([e for e, _, _ in pts], [100 * v for _, v, _ in pts], yerr=[_ci95(v, n) for _, v, n in pts],
                    fmt=fmt, ms=3, capsize=2, elinewidth=0.8, color=color, label=label, **kw)

    for j, threat in enumerate(threats):
        top, bottom = axes[0][j], axes[1][j]
        for k, r in enumerate(rs):
            color = colors[k % len(colors)]
            base = r.get("defense", {}).get("baseline", "full")
            name = DEFENSE_NAMES.get(base, base) + (f" ({r['name']})" if r.get("name") not in (base, None) else "")
            clean, n0 = r["clean"], r["n"]
            for attack, marker in markers.items():
                cs = sorted((c for c in r["cells"] if c["threat"] == threat and c["attack"] == attack),
                            key=lambda c: c["eps"])
                if not cs:
                    continue
                at = attack.upper()
                curve(top, [(0.0, clean["accuracy"], n0)] + [(c["eps"], c["accuracy"], c["n"]) for c in cs],
                      f"-{marker}", color, f"{name}: accuracy, {at}")
                if base != "none":  # C alone is the defense's classifier without M and the detectors
                    curve(top, [(0.0, clean["classifier_accuracy"], n0)]
                          + [(c["eps"], c["classifier_accuracy"], c["n"]) for c in cs],
                          f":{marker}", color, f"{name}: C alone, {at}", alpha=0.7)
                if threat == "oblivious" and clean.get("undefended_accuracy") is not None and k == 0:
                    curve(top, [(0.0, clean["undefended_accuracy"], n0)]
                          + [(c["eps"], c["source_accuracy"], c["n"]) for c in cs],
                          f"--{marker}", "0.45", f"undefended C: accuracy, {at}")
                curve(bottom, [(c["eps"], c["defended_accuracy"], c["n"]) for c in cs], f"-{marker}", color,
                      f"{name}: defended (flagged or correct), {at}")
                if r.get("defense", {}).get("detectors"):
                    fpr = clean["fpr"].get("any") or 0.0
                    curve(bottom, [(0.0, fpr, n0)] + [(c["eps"], c["detection_rate"], c["n"]) for c in cs],
                          f"--{marker}", color, f"{name}: flagged (ε = 0: false positives), {at}", alpha=0.7)
            claims = {e: claim_for(r.get("dataset", ""), base, "pgd", e)
                      for e in sorted({c["eps"] for c in r["cells"]})}
            pts = [(e, v) for e, v in claims.items() if v is not None]
            if pts:
                top.plot([e for e, _ in pts], [100 * v for _, v in pts], "x", ms=8, color=color,
                         label=f"{name}: paper's claim")
        for ax, title in ((top, "accuracy"), (bottom, "defended accuracy and detection")):
            classes = rs[0].get("num_classes") if rs else None
            if classes:
                ax.axhline(100 / classes, color="0.6", lw=0.8, ls="-.", label=f"chance ({100 / classes:.0f} %)")
            ax.set_title(f"{threat}: {title}", fontsize=9)
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
        bottom.set_xlabel("ε (L∞, [0, 1] pixels; 0 = clean)")
        if j == 0:
            top.set_ylabel("%")
            bottom.set_ylabel("%")
    handles: list[Any] = []
    labels: list[str] = []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    ncol = 3
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=6.5, frameon=False)
    n = rs[0]["n"] if rs else 0
    fig.suptitle(f"Accuracy vs ε per threat model ({n} images per point, 95 % binomial intervals)", fontsize=11)
    fig.tight_layout(rect=(0, 0.03 + 0.018 * ((len(labels) + ncol - 1) // ncol), 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
