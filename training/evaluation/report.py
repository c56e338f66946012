"""Render evaluation results as a terminal table (rich), Markdown and JSON."""

from __future__ import annotations

from fractions import Fraction
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
    ("threat", "threat"),
    ("attack", "attack"),
    ("eps", "ε"),
    ("source_accuracy", "attacked model acc %"),
    ("classifier_accuracy", "C alone acc %"),
    ("accuracy", "defense acc %"),
    ("detection_rate", "detected %"),
    ("defended_accuracy", "defended acc %"),
]


def _row(cell: dict[str, Any]) -> list[str]:
    out = []
    for key, _ in COLUMNS:
        v = cell[key]
        out.append(eps_label(v) if key == "eps" else v if isinstance(v, str) else _pct(v))
    return out


def clean_summary(result: dict[str, Any]) -> str:
    c = result["clean"]
    fpr = c["fpr"]
    und = "" if c.get("undefended_accuracy") is None else f", undefended classifier {_pct(c['undefended_accuracy'])} %"
    return (f"clean ({result['n']} images): defense accuracy {_pct(c['accuracy'])} %, C alone {_pct(c['classifier_accuracy'])} %{und}; "
            f"false-positive rate: reconstruction {_pct(fpr['recon_error'])} %, JSD {_pct(fpr['jsd'])} %, "
            f"P {_pct(fpr['p_score'])} %, any {_pct(fpr['any'])} % (target {_pct(result['target_fpr'])} % each)")


def rich_table(result: dict[str, Any], title: str = "") -> Table:
    table = Table(title=title or None, caption=clean_summary(result), caption_justify="left")
    for _, header in COLUMNS:
        table.add_column(header, justify="right" if header not in ("threat", "attack") else "left")
    for cell in result["cells"]:
        table.add_row(*_row(cell))
    return table


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for cell in result["cells"]:
        lines.append("| " + " | ".join(_row(cell)) + " |")
    return "\n".join(lines) + "\n\n" + clean_summary(result) + "\n"
