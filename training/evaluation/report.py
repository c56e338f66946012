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
    from training.evaluation.claims import claim_for

    out = []
    for r in _as_list(results):
        for c in r["cells"]:
            out.append({"defense": r.get("name", r.get("defense", {}).get("baseline", "full")), **c,
                        "claim": claim_for(r.get("dataset", ""), r.get("defense", {}).get("baseline", "full"), c["attack"], c["eps"])})
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
    caption = "\n".join([clean_summary(r) for r in rs] + ([f"[red]SANITY CHECK FAILED: {'; '.join(failed)}"] if failed else []))
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
    from training.evaluation.claims import SOURCE

    rs = _as_list(results)
    lines = [f"# {title}", ""] if title else []
    lines += _md([h for _, h in COLUMNS], [_cells(r) for r in rows(rs)])
    lines += ["", "Clean data (false-positive rates on the same clean images, each detector calibrated for the target FPR):", ""]
    lines += _md(["defense", "n", "labels", "defense acc %", "other labels acc %", "C alone acc %", "undefended acc %",
                  "FPR recon %", "FPR JSD %", "FPR P %", "FPR any %"],
                 [[r.get("name", ""), str(r["n"]), r.get("label_source", "reformed"), _pct(r["clean"]["accuracy"]),
                   _pct(r["clean"].get("accuracy_other")), _pct(r["clean"]["classifier_accuracy"]),
                   _pct(r["clean"].get("undefended_accuracy")), _pct(r["clean"]["fpr"].get("recon_error")),
                   _pct(r["clean"]["fpr"].get("jsd")), _pct(r["clean"]["fpr"].get("p_score")), _pct(r["clean"]["fpr"]["any"])]
                  for r in rs])
    lines += ["", "Sanity checks (on the same inputs; tolerance max(2 %, 3/n)):", ""]
    lines += _md(["defense", "check", "result", "detail"],
                 [[r.get("name", ""), c["name"], {True: "pass", False: "**FAIL**", None: "not run"}[c["passed"]], c["detail"]]
                  for r in rs for c in r.get("sanity", [])])
    datasets = sorted({r.get("dataset", "") for r in rs} & set(SOURCE))
    if datasets:
        lines += ["", "Paper claims are copied from " + "; ".join(SOURCE[d] for d in datasets)
                  + ", next to the rows of the same defense and attack level; they are not our measurements."]
    cfg = rs[0]["config"] if rs else {}
    if cfg:
        lines += ["", f"Settings: n = {rs[0]['n']} images per cell; PGD {cfg['pgd_steps']} steps × {cfg['pgd_restarts']} restart(s) "
                  f"(step 2.5·ε/steps, random start); adaptive PGD {cfg['adaptive_steps']} steps × {cfg['adaptive_restarts']} restart(s), "
                  f"BPDA {cfg['adaptive_bpda']}; Square {cfg['square_queries']} queries; seed {cfg['seed']}; "
                  f"device {rs[0].get('device')}, {rs[0].get('torch_threads')} threads; wall time "
                  + ", ".join(f"{r.get('name')} {r['wall_s']:.0f} s" for r in rs) + "."]
    return "\n".join(lines) + "\n"


def markdown_table(result: dict[str, Any] | Sequence[dict[str, Any]]) -> str:
    """Alias of :func:`markdown_report` without a title."""
    return markdown_report(result)


CSV_FIELDS = ["defense", "baseline", "dataset", "threat", "attack", "eps", "steps_factor", "sanity", "n", "source_accuracy",
              "classifier_accuracy", "accuracy", "detection_rate", "defended_accuracy", "claim", "wall_s", "attack_options"]


def csv_text(results: dict[str, Any] | Sequence[dict[str, Any]]) -> str:
    """Every cell (table and sanity cells) as CSV, fractions in [0, 1]."""
    from training.evaluation.claims import claim_for

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


def plot_accuracy_vs_eps(results: dict[str, Any] | Sequence[dict[str, Any]], path: str | Path) -> Path:
    """PNG: defense accuracy (top row) and defended accuracy (bottom row) vs ε, one column per threat model.

    Colour = defense, line style = attack; the paper's claims are drawn as crosses and labelled.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.evaluation.claims import claim_for

    rs = _as_list(results)
    threats = [t for t in ("oblivious", "known", "adaptive") if any(c["threat"] == t for r in rs for c in r["cells"])]
    styles = {"fgsm": ":", "pgd": "-", "square": "--"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, len(threats), figsize=(4.2 * len(threats), 7), squeeze=False, sharex=True, sharey=True)
    for j, threat in enumerate(threats):
        for i, metric in enumerate(("accuracy", "defended_accuracy")):
            ax = axes[i][j]
            for k, r in enumerate(rs):
                base = r.get("defense", {}).get("baseline", "full")
                for attack, ls in styles.items():
                    cs = sorted((c for c in r["cells"] if c["threat"] == threat and c["attack"] == attack), key=lambda c: c["eps"])
                    if cs:
                        ax.plot([c["eps"] for c in cs], [100 * c[metric] for c in cs], ls, marker="o", ms=3,
                                color=colors[k % len(colors)], label=f"{r.get('name')} {attack}")
                if metric == "accuracy":
                    claims = {e: claim_for(r.get("dataset", ""), base, "pgd", e) for e in sorted({c["eps"] for c in r["cells"]})}
                    pts = [(e, v) for e, v in claims.items() if v is not None]
                    if pts:
                        ax.plot([e for e, _ in pts], [100 * v for _, v in pts], "x", ms=8, color=colors[k % len(colors)],
                                label=f"{r.get('name')}: paper claim")
            ax.set_title(f"{threat}: {'defense accuracy' if metric == 'accuracy' else 'defended accuracy (flagged or correct)'}",
                         fontsize=9)
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
            if i == 1:
                ax.set_xlabel("ε (L∞, [0, 1] pixels)")
            if j == 0:
                ax.set_ylabel("%")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=7, frameon=False)
    n = rs[0]["n"] if rs else 0
    fig.suptitle(f"Accuracy vs ε per threat model ({n} images per point)", fontsize=11)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * ((len(labels) + 3) // 4), 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
