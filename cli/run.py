"""`ism-edge run` (being written in this session; replaced before it lands)."""

from __future__ import annotations

from cli._common import cli_errors, fail


@cli_errors
def run() -> None:
    """Not written yet."""
    raise fail("'ism-edge run' is not available in this build")
