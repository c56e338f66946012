"""Honest evaluation of a defense bundle and its baselines (docs/evaluation.md)."""

from ism_edge_training.evaluation.claims import CLAIMS, claim_for
from ism_edge_training.evaluation.protocol import (
    DEFAULT_EPS,
    Cell,
    EvalConfig,
    ThreatModel,
    evaluate_bundle,
    plan_cells,
)
from ism_edge_training.evaluation.report import (
    csv_text,
    markdown_report,
    markdown_table,
    plot_accuracy_vs_eps,
    rich_table,
)
from ism_edge_training.evaluation.sanity import sanity_checks

__all__ = [
    "CLAIMS",
    "DEFAULT_EPS",
    "Cell",
    "EvalConfig",
    "ThreatModel",
    "claim_for",
    "csv_text",
    "evaluate_bundle",
    "markdown_report",
    "markdown_table",
    "plan_cells",
    "plot_accuracy_vs_eps",
    "rich_table",
    "sanity_checks",
]
