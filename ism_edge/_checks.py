"""Reading what a user hands us (manifests, records) without trusting it.

Engine and bundle manifests come from disk, where anyone may have edited them. JSON files are
read with a size and nesting cap *before* parsing (a 100,000-deep nest is a ``RecursionError``
inside ``json``, a gigabyte file a memory blow-up); every field is then checked for its type,
range and form by the functions below, which raise :class:`FieldError` naming the field. The
callers turn that into their own one-line error with the file and the fix.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def cuda_index(device: str) -> int | None:
    """The GPU a device string names: N for ``cuda:N``, 0 for ``cuda`` and ``auto``, None otherwise."""
    if device in ("cuda", "auto"):
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    return None

#: Largest manifest read (a built engine manifest with its parity report is ~20 KB).
MAX_JSON_BYTES = 4 << 20
#: Deepest nesting of objects and lists in a manifest (ours nest 6 levels).
MAX_JSON_DEPTH = 32
#: Longest name, label or free text read from a manifest.
MAX_TEXT = 1024

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class FieldError(ValueError):
    """A field of a manifest is missing, of the wrong type or out of range; ``str()`` names it."""


class TooLargeError(ValueError):
    """A JSON file is larger or nested deeper than :func:`read_json` reads."""


def read_json_bytes(path: str | os.PathLike[str], *, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of ``path``; raises :class:`TooLargeError` beyond ``max_bytes`` (read no further)."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TooLargeError(f"it is larger than {max_bytes >> 20} MiB")
    return data


def parse_json(data: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON ``data`` after checking that objects and lists nest at most ``max_depth`` deep.

    Raises :class:`TooLargeError` for a deeper nest and :class:`ValueError` when ``data`` is not
    UTF-8 or not JSON (the reason, one line).
    """
    text = data.decode("utf-8")
    depth = 0
    for bracket in _BRACKET.findall(_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > max_depth:
            raise TooLargeError(f"it nests objects or lists more than {max_depth} levels deep")
    return json.loads(text)


def read_json(path: str | os.PathLike[str], *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse the JSON file ``path`` after checking its size and nesting depth.

    Raises :class:`OSError` when it cannot be read, :class:`TooLargeError` when it is too large or
    nested too deeply and :class:`ValueError` when it is not UTF-8 or not JSON.
    """
    return parse_json(read_json_bytes(path, max_bytes=max_bytes), max_depth=max_depth)


def show(value: Any) -> str:
    """``repr(value)``, cut to 40 characters for a one-line message."""
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def require(mapping: Mapping[str, Any], key: str, name: str) -> Any:
    """``mapping[key]``, or a :class:`FieldError` saying ``name`` is missing."""
    if key not in mapping:
        raise FieldError(f"{name} is missing")
    return mapping[key]


def obj(value: Any, name: str) -> dict[str, Any]:
    """A JSON object."""
    if not isinstance(value, dict):
        raise FieldError(f"{name} must be an object, got {show(value)}")
    return value


def array(value: Any, name: str, *, max_len: int = 100_000) -> list[Any]:
    """A JSON list of at most ``max_len`` entries."""
    if not isinstance(value, list):
        raise FieldError(f"{name} must be a list, got {show(value)}")
    if len(value) > max_len:
        raise FieldError(f"{name} has {len(value)} entries; at most {max_len} are allowed")
    return value


def number(value: Any, name: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite number in the interval from ``lo`` to ``hi`` (closed unless ``*_open``)."""
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(f"{name} must be a number in {interval}, got {show(value)}")
    x = float(value)
    if not math.isfinite(x) or x < lo or x > hi or (lo_open and x == lo) or (hi_open and x == hi):
        raise FieldError(f"{name} must be a finite number in {interval}, got {show(value)}")
    return x


def integer(value: Any, name: str, lo: int, hi: int) -> int:
    """A whole number (not a bool, not a float) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(f"{name} must be a whole number in [{lo}, {hi}], got {show(value)}")
    if not lo <= value <= hi:
        raise FieldError(f"{name} must be in [{lo}, {hi}], got {show(value)}")
    return value


def text(value: Any, name: str, *, max_len: int = MAX_TEXT, empty: bool = True) -> str:
    """A string without control characters (it ends up in one-line messages and logs)."""
    if not isinstance(value, str):
        raise FieldError(f"{name} must be a string, got {show(value)}")
    if len(value) > max_len:
        raise FieldError(f"{name} is {len(value)} characters long; at most {max_len} are allowed")
    if _CONTROL.search(value):
        raise FieldError(f"{name} contains control characters: {show(value)}")
    if not empty and not value:
        raise FieldError(f"{name} is empty")
    return value


def choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    """One of ``allowed``."""
    if value not in allowed:
        raise FieldError(f"{name} must be one of {', '.join(allowed)}, got {show(value)}")
    return str(value)


def sha256(value: Any, name: str) -> str:
    """A hex SHA-256 digest (64 lower-case hex digits)."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise FieldError(f"{name} must be a SHA-256 digest (64 hex digits), got {show(value)}")
    return value


def relative_file(value: Any, name: str) -> str:
    """A file name relative to the manifest's directory that cannot leave it by its spelling:
    no absolute path, no ``..``, no backslash, no empty component."""
    name_text = text(value, name, max_len=255, empty=False)
    segments = name_text.split("/")
    if "\\" in name_text or ":" in segments[0] or any(s in ("", ".", "..") for s in segments):
        raise FieldError(f"{name} must be a plain file name inside the directory, got {show(value)}")
    return name_text


def inside(directory: str | os.PathLike[str], name: str) -> Path:
    """``directory / name`` after checking that it resolves inside ``directory`` (a symbolic link
    anywhere on the way may not lead out of it); raises :class:`FieldError` otherwise."""
    root = Path(directory).resolve()
    path = Path(directory) / name
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise FieldError(f"{path} leads outside {directory} (to {resolved})")
    return path
