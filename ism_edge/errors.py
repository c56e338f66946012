"""Error types shared by every ism-edge package.

Every expected failure (bad input, missing file, version mismatch, unreachable camera) raises an
:class:`IsmEdgeError` subclass whose message is one line that names the file or source and says
how to fix the problem. The CLI prints that line and exits with :attr:`ExitCode.BAD_INPUT`; no
traceback is shown.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The exit codes of every ``ism-edge`` command, in one place: ``ism-edge --help`` and the README
    list them, scripts and supervisors (systemd, a CI job) branch on them.

    2 for a usage error is the convention of click, argparse and the shell's builtins; 1 is left to
    what no one expected (an uncaught exception: Python's own exit code, with its traceback), so a
    script can tell a bug from bad input; a signal is 128 + its number, as the shell reports it.
    """

    OK = 0
    BUG = 1
    USAGE = 2
    BAD_INPUT = 3
    FLAGGED = 4
    HANGUP = 129
    INTERRUPTED = 130
    TERMINATED = 143

    @property
    def meaning(self) -> str:
        """One line on when a command exits with this code."""
        return _EXIT_MEANINGS[self]


_EXIT_MEANINGS = {  # one line each, short enough for an 80-column `ism-edge --help`
    ExitCode.OK: "success",
    ExitCode.BUG: "an unexpected failure: a bug (with its traceback); please report it",
    ExitCode.USAGE: "usage error (unknown option, missing argument, value out of range)",
    ExitCode.BAD_INPUT: "bad input (missing/corrupt file or engine, camera, extra, memory)",
    ExitCode.FLAGGED: "'run --fail-on-flag': the run finished and flagged at least one frame",
    ExitCode.HANGUP: "stopped by SIGHUP (the terminal closed), as for Ctrl-C",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C): outputs finalised, partial files removed",
    ExitCode.TERMINATED: "stopped by SIGTERM (kill, systemctl/docker stop), as for Ctrl-C",
}


def exit_code_for_signal(signum: int) -> ExitCode:
    """The exit code of a command stopped by signal ``signum``: 128 + its number, as a shell reports it."""
    return ExitCode(128 + signum)


class IsmEdgeError(Exception):
    """Base class of all expected ism-edge failures; ``str(err)`` is the one-line message."""

    exit_code: int = ExitCode.BAD_INPUT


class DataError(IsmEdgeError):
    """A dataset is missing, malformed or of an unsupported layout."""


class BundleError(IsmEdgeError):
    """A defense bundle is missing, corrupt or incompatible."""


class EngineError(IsmEdgeError):
    """An engine directory is missing, corrupt, tampered with or built for another target."""


class EngineMismatchError(EngineError):
    """An engine was built for another GPU, TensorRT/ORT version or bundle: rebuild it."""


class ParityError(EngineError):
    """An exported graph disagrees with PyTorch beyond tolerance."""


class SourceError(IsmEdgeError):
    """A frame source (camera, stream, file, folder) cannot be opened or stopped delivering."""


class OutputError(IsmEdgeError):
    """An output (verdict log, video file, display) cannot be opened or written."""


class FrameError(IsmEdgeError):
    """A frame has the wrong shape, dtype or non-finite values."""


class MissingDependencyError(IsmEdgeError):
    """An optional dependency is not installed; the message names the extra to install."""


def missing_dependency(module: str, extra: str, purpose: str) -> MissingDependencyError:
    """Build the error for an optional module that failed to import."""
    return MissingDependencyError(
        f"{purpose} needs the Python module '{module}', which is not installed: "
        f"pip install 'ism-edge[{extra}]'"
    )


def caused_by_interrupt(error: BaseException) -> bool:
    """Whether ``error`` is, or was raised while handling, a KeyboardInterrupt: libraries (torch.onnx,
    onnxruntime) wrap a Ctrl-C that hits them mid-step in an error of their own."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
