"""`ism-edge build` (being written in this session; replaced before it lands)."""

from __future__ import annotations

from cli._common import cli_errors, fail


@cli_errors
def build() -> None:
    """Not written yet."""
    raise fail("'ism-edge build' is not available in this build")
