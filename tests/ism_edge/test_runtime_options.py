"""RuntimeOptions validation: values that cannot work are refused when the options are made."""

from __future__ import annotations

import pytest

from ism_edge.runtime import RuntimeOptions, max_threads


def test_threads_are_bounded_by_the_cores_available() -> None:
    """--threads 5000 ran for minutes without a frame and 100,000 reached 2.8 GB: refuse them at once."""
    limit = max_threads()
    assert RuntimeOptions(threads=limit).threads == limit and RuntimeOptions(threads=1).threads == 1
    for bad in (limit + 1, 5000, 100_000):
        with pytest.raises(ValueError, match=rf"threads must be between 1 and {limit} .*cores.*got {bad}"):
            RuntimeOptions(threads=bad)
    with pytest.raises(ValueError, match="threads must be between 1"):
        RuntimeOptions(threads=0)


def test_feedback_rounds_are_bounded_as_in_a_manifest() -> None:
    """Each round runs M and C again on the flagged frames: a manifest holds at most 100, and so may a caller."""
    assert RuntimeOptions(feedback_rounds=0).feedback_rounds == 0
    assert RuntimeOptions(feedback_rounds=100).feedback_rounds == 100
    for bad in (-1, 101, 10**9):
        with pytest.raises(ValueError, match=rf"feedback_rounds must be in \[0, 100\], got {bad}"):
            RuntimeOptions(feedback_rounds=bad)
