"""`ism-edge evaluate` (being written in this session; replaced before it lands)."""

from __future__ import annotations

from cli._common import cli_errors, fail


@cli_errors
def evaluate() -> None:
    """Not written yet."""
    raise fail("'ism-edge evaluate' is not available in this build")
