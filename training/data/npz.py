"""Image sets stored as NumPy ``.npz`` archives: ``x`` uint8 NHWC, ``y`` labels, optional
``exact`` (bool), ``index`` and ``class_names``; several files are parts concatenated in order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ism_edge.errors import DataError
from ism_edge_training.data.cifar10 import CIFAR10_CLASSES

FORMAT_HINT = "an image .npz holds x (uint8, N×H×W×C RGB) and y (integer labels, N), optionally exact (bool, N)"


@dataclass(frozen=True)
class NpzParts:
    """The concatenated contents of one or more ``.npz`` parts."""

    x: np.ndarray
    y: np.ndarray
    exact: np.ndarray | None
    class_names: tuple[str, ...]
    class_names_source: str


def _check_zip(path: Path) -> None:
    """An ``.npz`` is a zip archive: say what the file really is when it is not one (``np.load``
    would call a text file "pickled data")."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror or e}): check the path and its permissions") from None
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return
    if head.startswith(b"\x93NUMPY"):
        what = "a single .npy array"
    elif not head:
        what = "an empty file"
    elif all(32 <= c < 127 or c in b"\t\r\n" for c in head):
        what = "a text file"
    else:
        what = f"a file starting with bytes {head[:4].hex(' ')}"
    raise DataError(f"{path} is not a valid .npz archive (an .npz is a zip file; this is {what}): "
                    f"re-create it with numpy.savez_compressed; {FORMAT_HINT}")


def _read_part(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    _check_zip(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            missing = [k for k in ("x", "y") if k not in keys]
            if missing:
                raise DataError(f"{path} lacks array(s) {', '.join(missing)} "
                                f"(it has {', '.join(sorted(keys)) or 'none'}): {FORMAT_HINT}")
            x, y = z["x"], z["y"]
            exact = z["exact"] if "exact" in keys else None
            names = z["class_names"] if "class_names" in keys else None
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path} is not a readable .npz archive "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:120]}): "
                        f"re-copy it or re-create it with numpy.savez_compressed") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{path}: x is {x.dtype} {x.shape}, expected uint8 (N, H, W, C) with C = 1 or 3; {FORMAT_HINT}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{path}: y is {y.dtype} {y.shape}, expected integer labels of shape ({len(x)},); {FORMAT_HINT}")
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: y holds negative labels; labels are class indices 0..K-1")
    if exact is not None and (exact.dtype != np.bool_ or exact.shape != (len(x),)):
        raise DataError(f"{path}: exact is {exact.dtype} {exact.shape}, expected bool of shape ({len(x)},)")
    class_names = None
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US" or not len(names):
            raise DataError(f"{path}: class_names is {names.dtype} {names.shape}, expected a 1-D array of strings")
        class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())
    return x, y.astype(np.int64), exact, class_names


def read_npz_parts(paths: Sequence[Path], *, num_classes: int | None = None,
                   class_names: Sequence[str] | None = None) -> NpzParts:
    """Read and concatenate ``.npz`` parts in order (e.g. the three parts of the 50k CIFAR-10 set).

    Files without ``exact`` count as all-exact. Class names come from a ``class_names`` array
    when present, else from the caller (``class_names``, or ``num_classes`` generic names), else the
    CIFAR-10 names for 32×32×3 images with labels below 10 (the layout of this project's CIFAR-10
    files), else ``class_0`` … ``class_{K-1}`` for labels 0 … K−1 — refused when some of those
    classes have no image, the mark of a label outside the class list (a stray 57 among CIFAR-10
    labels would otherwise train a 58-class model).
    """
    parts = [_read_part(p) for p in paths]
    shape = parts[0][0].shape[1:]
    for p, (x, *_rest) in zip(paths[1:], parts[1:], strict=True):
        if x.shape[1:] != shape:
            raise DataError(
                f"{p}: images are {x.shape[1:]} but {paths[0]} has {shape}: parts of one data set must match")
    named = [(p, part[3]) for p, part in zip(paths, parts, strict=True) if part[3] is not None]
    for p, names in named[1:]:
        if names != named[0][1]:
            raise DataError(f"{p}: class_names differ from those in {named[0][0]}: parts of one data set must match")
    x = np.concatenate([part[0] for part in parts])
    y = np.concatenate([part[1] for part in parts])
    exact = None
    if any(part[2] is not None for part in parts):
        exact = np.concatenate([part[2] if part[2] is not None else np.ones(len(part[1]), bool) for part in parts])
    top = int(y.max()) if len(y) else 0
    where = paths[0] if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more parts)"
    declared = declared_names(num_classes, class_names, shape)
    if named:
        class_names_, source = named[0][1], "npz"
        if top >= len(class_names_):
            raise DataError(f"{named[0][0]}: labels reach {top} but class_names lists only {len(class_names_)} classes")
        if declared is not None and declared != class_names_:
            raise DataError(f"{named[0][0]} names its {len(class_names_)} classes {list(class_names_)[:4]}…, "
                            f"not the declared {list(declared)[:4]}… ({len(declared)}): "
                            "drop --classes/--num-classes or fix them")
    elif declared is not None:
        if top >= len(declared):
            raise DataError(f"{where}: labels reach {top} but {len(declared)} classes were declared "
                            f"(--classes/--num-classes): fix the labels or declare {top + 1} classes")
        class_names_, source = declared, "declared"
    elif shape == (32, 32, 3) and top < len(CIFAR10_CLASSES):
        class_names_, source = CIFAR10_CLASSES, "cifar10"
    else:
        empty = np.flatnonzero(np.bincount(y, minlength=top + 1) == 0)
        if len(empty):
            gap = ", ".join(map(str, empty[:3])) + (", …" if len(empty) > 3 else "")
            raise DataError(f"{where}: labels reach {top}, so {top + 1} classes, but {len(empty)} of them ({gap}) "
                            f"have no image: a label outside the class list? Fix the labels, "
                            f"or declare the classes with --num-classes {top + 1} (or --classes NAME,...)")
        class_names_, source = tuple(f"class_{i}" for i in range(top + 1)), "generic"
    return NpzParts(x, y, exact, class_names_, source)


def declared_names(num_classes: int | None, class_names: Sequence[str] | None,
                   shape: tuple[int, ...] | None = None) -> tuple[str, ...] | None:
    """The class list a caller declares: ``class_names``, else ``num_classes`` names (CIFAR-10's for
    ten classes of 32×32×3 images, else ``class_i``), else None."""
    if class_names is not None:
        names = tuple(str(c) for c in class_names)
        if len(names) < 2 or len(set(names)) != len(names) or any(not n for n in names):
            raise DataError(f"the declared classes {list(names)[:6]} must be at least two distinct, non-empty names")
        if num_classes is not None and num_classes != len(names):
            raise DataError(f"{len(names)} class names were declared for {num_classes} classes: give one or the other")
        return names
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise DataError(f"the declared number of classes must be a whole number >= 2, got {num_classes!r}")
    if num_classes == len(CIFAR10_CLASSES) and shape == (32, 32, 3):
        return CIFAR10_CLASSES
    return tuple(f"class_{i}" for i in range(num_classes))
