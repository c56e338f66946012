"""CelebA in its standard layout (Liu et al., "Deep Learning Face Attributes in the Wild",
ICCV 2015): aligned 178×218 JPEGs in ``img_align_celeba/``, the 40 binary attributes in
``list_attr_celeba.txt`` and the train/valid/test partition in ``list_eval_partition.txt``.

One chosen attribute becomes a two-class label: 0 = ``not_<Attr>`` (value -1), 1 = ``<Attr>`` (+1).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ism_edge.errors import DataError

ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_DIR = "img_align_celeba"
SPLITS = {"train": 0, "valid": 1, "test": 2, "all": None}
DEFAULT_IMAGE_SIZE = 64


@dataclass(frozen=True)
class CelebALayout:
    """Where the parts of one CelebA copy live (the standard flat layout, the official
    ``Anno/``, ``Eval/``, ``Img/`` download layout, or torchvision's ``celeba/`` folder)."""

    root: Path
    attr_file: Path
    image_dir: Path
    partition_file: Path | None


def find_celeba(root: Path) -> CelebALayout | None:
    """The CelebA layout under ``root``, or None when it has no attribute file or image folder."""
    dirs = [root, root / "celeba", root / "Anno", root / "Eval", root / "Img"]
    attr = next((d / ATTR_FILE for d in dirs if (d / ATTR_FILE).is_file()), None)
    images = next((d / IMAGE_DIR for d in dirs if (d / IMAGE_DIR).is_dir()), None)
    if attr is None or images is None:
        return None
    partition = next((d / PARTITION_FILE for d in dirs if (d / PARTITION_FILE).is_file()), None)
    return CelebALayout(root, attr, images, partition)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}): it should be plain ASCII text") from None


def read_attributes(path: Path) -> tuple[tuple[str, ...], list[str], np.ndarray]:
    """Parse ``list_attr_celeba.txt``: attribute names, image file names and an int8 (N, A) array of ±1.

    Line 1 is the image count, line 2 the attribute names, then ``NNNNNN.jpg  v1 … vA``.
    """
    lines = _read_lines(path)
    if len(lines) < 2:
        raise DataError(f"{path} is too short: line 1 should be the image count and line 2 the attribute names")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise DataError(f"{path} line 1 is {lines[0][:40]!r}, expected the number of images") from None
    names = tuple(lines[1].split())
    if not names:
        raise DataError(f"{path} line 2 should list the attribute names, but it is empty")
    files: list[str] = []
    rows: list[list[str]] = []
    for lineno, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise DataError(f"{path} line {lineno}: expected an image name and {len(names)} values of ±1, "
                            f"got {len(parts) - 1} values")
        files.append(parts[0])
        rows.append(parts[1:])
    try:
        values = np.array(rows, dtype=np.int8).reshape(len(rows), len(names))
    except ValueError:
        values = None
    if values is None or not np.isin(values, (-1, 1)).all():
        raise DataError(f"{path}: attribute values must all be 1 or -1")
    if count != len(files):
        raise DataError(f"{path} says it lists {count} images but holds {len(files)} image lines: "
                        f"the file is truncated or its count line is wrong")
    return names, files, values


def read_partition(path: Path) -> dict[str, int]:
    """Parse ``list_eval_partition.txt``: image file name → 0 (train), 1 (valid) or 2 (test)."""
    out: dict[str, int] = {}
    for lineno, line in enumerate(_read_lines(path), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataError(f"{path} line {lineno}: expected 'NNNNNN.jpg P' with P = 0, 1 or 2, got {line[:60]!r}")
        out[parts[0]] = int(parts[1])
    return out


def resolve_attribute(attribute: str, names: tuple[str, ...], path: Path) -> int:
    """Column of ``attribute`` in ``names`` (exact, else case-insensitive); DataError listing valid names."""
    if attribute in names:
        return names.index(attribute)
    lower = [n.lower() for n in names]
    if attribute.lower() in lower:
        return lower.index(attribute.lower())
    close = difflib.get_close_matches(attribute, names, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise DataError(f"attribute {attribute!r} is not in {path}: {hint}valid names include "
                    f"{', '.join(names[:6])}, ... ({len(names)} in all)")


@dataclass(frozen=True)
class CelebASelection:
    """The labelled images of one split that exist on disk, before decoding."""

    layout: CelebALayout
    attribute: str
    files: list[str]
    labels: np.ndarray
    skipped_without_image: int


def select_celeba(layout: CelebALayout, split: str, attribute: str) -> CelebASelection:
    """Images of ``split`` that have an attribute line and an image file, labelled by ``attribute``."""
    if split not in SPLITS:
        raise DataError(f"split {split!r} does not exist in CelebA ({layout.root}): use one of {', '.join(SPLITS)}")
    names, files, values = read_attributes(layout.attr_file)
    col = resolve_attribute(attribute, names, layout.attr_file)
    keep = np.ones(len(files), dtype=bool)
    if SPLITS[split] is not None:
        if layout.partition_file is None:
            raise DataError(f"{layout.root} has no {PARTITION_FILE}, which split {split!r} needs: "
                            f"add the file or use split 'all'")
        partition = read_partition(layout.partition_file)
        keep &= np.array([partition.get(f) == SPLITS[split] for f in files], dtype=bool)
    on_disk = set(os.listdir(layout.image_dir))
    exists = np.array([f in on_disk for f in files], dtype=bool)
    skipped = int((keep & ~exists).sum())
    keep &= exists
    if not keep.any():
        raise DataError(f"no CelebA image of split {split!r} in {layout.root} has both a line in "
                        f"{layout.attr_file.name} and a file in {layout.image_dir}: check the paths or the split")
    idx = np.flatnonzero(keep)
    labels = (values[idx, col] > 0).astype(np.int64)
    return CelebASelection(layout, names[col], [files[i] for i in idx], labels, skipped)
