"""Honest evaluation of a defense bundle (SPEC §3)."""

from training.evaluation.protocol import DEFAULT_EPS, EvalConfig, ThreatModel, evaluate_bundle
from training.evaluation.report import markdown_table, rich_table

__all__ = ["DEFAULT_EPS", "EvalConfig", "ThreatModel", "evaluate_bundle", "markdown_table", "rich_table"]
