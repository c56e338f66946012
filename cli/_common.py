"""Helpers shared by the CLI commands: one-line errors, exit codes, parsing of list options."""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from enum import Enum
from fractions import Fraction
from typing import Any, TypeVar

import typer
from typer.core import TyperGroup

from ism_edge.errors import ExitCode, IsmEdgeError, caused_by_interrupt, exit_code_for_signal


class Backend(str, Enum):
    """The --backend choices of build and run."""

    auto = "auto"
    tensorrt = "tensorrt"
    onnxruntime = "onnxruntime"


class Mode(str, Enum):
    """The --mode choices of run, calibrate and bench (ism_edge.preprocess.MODES)."""

    resize = "resize"
    tile = "tile"


def parse_grid(text: str, form: str = "ROWSxCOLS, e.g. 2x3", what: str = "rows and columns",
               option: str | None = None) -> tuple[int, int]:
    """Parse two positive whole numbers ``AxB`` (``ROWSxCOLS`` such as ``2x3`` unless ``form`` says
    otherwise); a usage error naming ``option``, when given, otherwise."""
    hint = None if option is None else f"'{option}'"
    try:
        a, b = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not {form}", param_hint=hint) from None
    if a < 1 or b < 1:
        raise typer.BadParameter(f"{text!r}: {what} must be >= 1", param_hint=hint)
    return a, b


def tile_grid_for(mode: Mode, text: str | None) -> tuple[int, int] | None:
    """``--tile-grid ROWSxCOLS``, which only tile mode takes."""
    grid = parse_grid(text) if text else None
    if grid is not None and mode != Mode.tile:
        raise typer.BadParameter("--tile-grid needs --mode tile")
    return grid


F = TypeVar("F", bound=Callable[..., Any])


def _click_exception(name: str) -> type[Exception]:
    """click's exception class ``name`` (typer vendors click in recent releases, depends on it before)."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


class OneLineErrors(TyperGroup):
    """The ``ism-edge`` command group: a usage error (a bad option value, a missing argument, an
    unknown option) is one ``error:`` line and exit code :attr:`ExitCode.USAGE`, like every other
    expected failure (the README's "Exit codes"), instead of typer's five-line box."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _click_exception("ClickException") as e:
            raise _usage_exit(e) from None

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _click_exception("ClickException") as e:
            raise _usage_exit(e) from None


def _usage_exit(e: Exception) -> Exception:
    """Print ``e`` (a click exception) as one ``error:`` line and return the Exit to raise;
    the help that a bare ``ism-edge`` prints is passed on unchanged."""
    if type(e).__name__ == "NoArgsIsHelpError":
        return e
    message = " ".join(e.format_message().split()).rstrip(".")  # type: ignore[attr-defined]
    ctx = getattr(e, "ctx", None)
    if ctx is not None and type(e).__name__ != "FileError":
        message += f" (see '{ctx.command_path} --help')"
    return fail(message, ExitCode.USAGE)


def fail(message: str, code: int = ExitCode.BAD_INPUT) -> typer.Exit:
    """Print ``error: message`` on stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(int(code))


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP inside :func:`sigterm_interrupts`: handled as Ctrl-C, but the exit code names
    the signal (128 + its number)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupted(error: BaseException | None = None) -> typer.Exit:
    """``interrupted`` (Ctrl-C) or ``stopped by SIGTERM`` on stderr, and the Exit with the signal's code."""
    signum = _stop_signal(error)
    if signum is None:
        typer.echo("interrupted", err=True)
        return typer.Exit(int(ExitCode.INTERRUPTED))
    typer.echo(f"stopped by {signal.Signals(signum).name}", err=True)
    return typer.Exit(int(exit_code_for_signal(signum)))


def _stop_signal(error: BaseException | None) -> int | None:
    """The signal of the :class:`Terminated` that ``error`` is or was raised from; None for Ctrl-C."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Terminated):
            return error.signum
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def cli_errors(fn: F) -> F:
    """Turn expected failures into one clear line on stderr and a non-zero exit; no traceback.

    Ctrl-C is ``interrupted`` and exit code 130, also when a library wrapped it in its own error;
    the exit codes are :class:`ism_edge.errors.ExitCode`.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            raise _interrupted(e) from None
        except IsmEdgeError as e:
            if caused_by_interrupt(e):
                raise _interrupted(e) from None
            raise fail(str(e), e.exit_code) from None
        except MemoryError:
            raise fail("out of memory: lower --batch-size") from None
        except Exception as e:
            if caused_by_interrupt(e):
                raise _interrupted(e) from None
            raise

    return wrapper  # type: ignore[return-value]


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM (``kill``, ``systemctl stop``, ``docker stop``) and SIGHUP (the
    terminal closed) end the command as Ctrl-C does: cleanup runs (no partial output is left), then
    ``stopped by SIGTERM`` and exit code 143 (129 for SIGHUP)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {signum: signal.signal(signum, _raise_interrupt) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def keep_freed_memory() -> None:
    """Let this process reuse the memory of freed tensors instead of returning it to the OS (glibc).

    PyTorch's CPU allocator frees every intermediate tensor; glibc gives blocks above its
    (dynamic) mmap threshold back to the kernel and trims the heap top, so each attack or training
    step page-faults the same memory in again. A fixed 32 MiB mmap threshold and a 1 GiB trim
    threshold keep it, for identical results in less time at the cost of a larger resident set
    (measured in docs/evaluation.md, "Cost"). A no-op off glibc.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 1 << 30)


def parse_eps(text: str) -> list[float]:
    """Parse ``8/255,0.1,0.2`` into floats (L∞ budgets on the [0, 1] pixel scale)."""
    out: list[float] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(Fraction(part))
        except (ValueError, ZeroDivisionError):
            raise typer.BadParameter(f"{part!r} is not a number or fraction like 8/255") from None
        if not 0.0 <= value <= 1.0:
            raise typer.BadParameter(f"epsilon {part} is outside [0, 1] (pixels are on the [0, 1] scale)")
        out.append(value)
    if not out:
        raise typer.BadParameter("no epsilon given")
    return out


def parse_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    """Parse a comma-separated list and check every entry is allowed."""
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise typer.BadParameter(f"{what} must be a comma-separated subset of {', '.join(allowed)}; got {text!r}")
    return items


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr)


def table_console(*, stderr: bool = False) -> Any:
    """A rich console for tables: on a terminal its width, elsewhere (a pipe, a log file, CI) wide
    enough that no column is squashed to "defe…"."""
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    return console if console.is_terminal else Console(stderr=stderr, highlight=False, width=200)


def require_training(purpose: str) -> None:
    """One line naming the extra, not a traceback, when a training-side command runs in a
    runtime-only install (``pip install ism-edge`` without ``[train]``)."""
    from ism_edge.errors import missing_dependency

    for module in ("torch", "safetensors", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            raise missing_dependency(module, "train", purpose) from None
