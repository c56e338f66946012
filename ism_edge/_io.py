"""Atomic file and directory writes: nothing half-written is ever left under a final name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public_mode(path: str | os.PathLike[str], directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the modes open() would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _public_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _owner() -> str:
    """``HOST-PID`` of this process: names the temporary directories it owns."""
    host = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname()).strip("-") or "host"
    return f"{host}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def remove_stale_partials(final: str | os.PathLike[str]) -> list[Path]:
    """Remove what killed writers of ``final`` left next to it; returns what was removed or restored.

    :func:`atomic_directory` names its temporary directory ``.NAME.HOST-PID.XXXX.partial`` and,
    while it swaps, the replaced directory ``.NAME.HOST-PID.old``. A writer killed with SIGKILL
    (or power loss) leaves them behind. One is stale when it was made on this host by a process
    that is gone: a stale partial is deleted; a stale ``.old`` is renamed back to ``final`` when
    ``final`` is missing (the writer died between the two renames), else deleted. Directories of
    live processes, of other hosts, or of an older naming are never touched.
    """
    final = Path(final)
    host = _owner().rsplit("-", 1)[0]
    pattern = re.compile(rf"\.{re.escape(final.name)}\.{re.escape(host)}-(\d+)(?:\.[^/]*\.partial|\.old)")
    done: list[Path] = []
    try:
        entries = sorted(final.parent.iterdir())
    except OSError:
        return done
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink() or _pid_alive(int(match.group(1))):
            continue
        if entry.name.endswith(".old") and not final.exists():
            os.replace(entry, final)
        else:
            shutil.rmtree(entry, ignore_errors=True)
        done.append(entry)
    return done


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` in one rename.

    If the body raises (or is interrupted with Ctrl-C) the temporary directory is removed and
    whatever was at ``final`` before is left untouched. What an earlier writer of ``final`` that
    was killed outright left behind is cleaned up first (:func:`remove_stale_partials`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    owner = _owner()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{owner}.", suffix=".partial", dir=final.parent))
    _public_mode(tmp, directory=True)
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            old = final.with_name(f".{final.name}.{owner}.old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
