"""Atomic directories: what a writer killed outright leaves behind is cleaned up by the next one,
never what a live writer is still filling (issue 18)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ism_edge._io import _owner, atomic_directory, remove_stale_partials


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


@pytest.fixture
def live_pid() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _made(path: Path) -> Path:
    path.mkdir()
    (path / "half.onnx").write_bytes(b"half")
    return path


def test_only_partials_of_dead_writers_of_the_same_target_are_removed(tmp_path: Path, dead_pid: int,
                                                                      live_pid: int) -> None:
    host = _owner().rsplit("-", 1)[0]
    stale = _made(tmp_path / f".engines.{host}-{dead_pid}.k3j2h1g0.partial")
    kept = [
        _made(tmp_path / f".engines.{host}-{live_pid}.a1b2c3d4.partial"),  # another build, still running
        _made(tmp_path / f".engines.{_owner()}.e5f6g7h8.partial"),  # this process's own
        _made(tmp_path / f".engines.otherhost-{dead_pid}.i9j8k7l6.partial"),  # made on another machine
        _made(tmp_path / ".engines.m5n4o3p2.partial"),  # the old naming: owner unknown
        _made(tmp_path / f".engines2.{host}-{dead_pid}.q1r2s3t4.partial"),  # another target
    ]
    assert remove_stale_partials(tmp_path / "engines") == [stale]
    assert not stale.exists() and all(p.is_dir() for p in kept)


def test_a_swap_cut_short_is_undone(tmp_path: Path, dead_pid: int) -> None:
    """A writer killed between its two renames left the previous directory as .NAME.HOST-PID.old."""
    host = _owner().rsplit("-", 1)[0]
    old = _made(tmp_path / f".engines.{host}-{dead_pid}.old")
    assert remove_stale_partials(tmp_path / "engines") == [old]
    assert (tmp_path / "engines" / "half.onnx").read_bytes() == b"half"
    old = _made(tmp_path / f".engines.{host}-{dead_pid}.old")
    remove_stale_partials(tmp_path / "engines")  # the target exists: the old copy is only removed
    assert not old.exists() and (tmp_path / "engines" / "half.onnx").is_file()


def test_the_next_atomic_write_cleans_up(tmp_path: Path, dead_pid: int) -> None:
    host = _owner().rsplit("-", 1)[0]
    stale = _made(tmp_path / f".engines.{host}-{dead_pid}.k3j2h1g0.partial")
    with atomic_directory(tmp_path / "engines") as tmp:
        assert tmp.name.startswith(f".engines.{_owner()}.") and tmp.name.endswith(".partial")
        (tmp / "manifest.json").write_text("{}")
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["engines"]


def test_cuda_index_reads_the_device_strings_every_backend_takes() -> None:
    from ism_edge._checks import cuda_index

    assert [cuda_index(d) for d in ("cuda", "auto", "cuda:0", "cuda:3", "cpu", "cuda:", "cuda:x", "gpu")] == [
        0, 0, 0, 3, None, None, None, None]
