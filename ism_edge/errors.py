"""Error types shared by every ism-edge package.

Every expected failure (bad input, missing file, version mismatch, unreachable camera) raises an
:class:`IsmEdgeError` subclass whose message is one line that names the file or source and says
how to fix the problem. The CLI prints that line and exits non-zero; no traceback is shown.
"""

from __future__ import annotations


class IsmEdgeError(Exception):
    """Base class of all expected ism-edge failures; ``str(err)`` is the one-line message."""

    exit_code = 2


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
