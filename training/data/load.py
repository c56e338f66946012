"""One entry point for every supported data set layout (docs/training.md, "Data"): :func:`load_dataset`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np

from ism_edge._io import sha256_file
from ism_edge.errors import DataError
from ism_edge_training.data import celeba, cifar10, folder
from ism_edge_training.data.arrays import ImageArrays, stratified_indices
from ism_edge_training.data.images import files_digest, fit_all, read_images
from ism_edge_training.data.npz import declared_names, read_npz_parts

KINDS = ("cifar10-pickle", "cifar10-binary", "npz", "celeba", "folder")
LAYOUTS = ("a CIFAR-10 cifar-10-batches-py or cifar-10-batches-bin directory (or its parent), "
           ".npz files with x and y arrays, a CelebA directory (img_align_celeba/ and list_attr_celeba.txt) "
           "or an image folder root/<class_name>/*.png|jpg|jpeg|bmp")


_DECLARED: ContextVar[tuple[int | None, tuple[str, ...] | None]] = ContextVar("declared_classes", default=(None, None))


@contextlib.contextmanager
def declared_classes(num_classes: int | None = None, class_names: Sequence[str] | None = None) -> Iterator[None]:
    """Declare the class list for every :func:`load_dataset` call in the block that does not pass one.

    ``ism-edge train --num-classes/--classes``: the training recipe loads its data itself.
    """
    token = _DECLARED.set((num_classes, None if class_names is None else tuple(class_names)))
    try:
        yield
    finally:
        _DECLARED.reset(token)


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise DataError(f"dataset path {path} does not exist: check the path "
                        f"(data sets are never downloaded automatically)")


def detect_kind(path: str | os.PathLike[str]) -> str:
    """The layout of the data set at ``path``: one of :data:`KINDS`.

    A ``.npz`` file is ``npz``; a directory holding CIFAR-10 batches (or holding
    ``cifar-10-batches-py`` / ``cifar-10-batches-bin``) is ``cifar10-pickle`` / ``cifar10-binary``;
    one with ``list_attr_celeba.txt`` and ``img_align_celeba/`` is ``celeba``; one whose
    sub-folders hold images is ``folder``.
    """
    p = Path(path).expanduser()
    _check_exists(p)
    if p.is_file():
        if p.suffix.lower() == ".npz":
            return "npz"
        raise DataError(f"cannot tell the data set layout of file {p}: accepted layouts are {LAYOUTS}")
    if cifar10.find_pickle_dir(p):
        return "cifar10-pickle"
    if cifar10.find_binary_dir(p):
        return "cifar10-binary"
    if celeba.find_celeba(p):
        return "celeba"
    if folder.is_image_folder(p):
        return "folder"
    if any(p.glob("*.npz")):
        raise DataError(
            f"{p} is a directory of .npz files: pass the .npz file(s) themselves, e.g. {next(p.glob('*.npz'))}")
    raise DataError(f"cannot tell the data set layout of directory {p}: accepted layouts are {LAYOUTS}")


def _as_paths(paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise DataError(f"no data set path given: pass {LAYOUTS}")
    out = [Path(p).expanduser().absolute() for p in items]
    for p in out:
        _check_exists(p)
    return out


def _resolve_kind(paths: list[Path], kind: str) -> str:
    if kind == "auto":
        kinds = [detect_kind(p) for p in paths]
        if len(set(kinds)) > 1:
            found = ", ".join(f"{p} is {k}" for p, k in zip(paths, kinds, strict=True))
            raise DataError(f"the data set paths have different layouts ({found}): pass one data set")
        kind = kinds[0]
    elif kind not in KINDS:
        raise DataError(f"unknown data set kind {kind!r}: use auto or one of {', '.join(KINDS)}")
    if len(paths) > 1 and kind != "npz":
        raise DataError(f"{len(paths)} paths given for one {kind} data set ({paths[0]}, ...): "
                        f"only .npz parts can be combined; pass one directory")
    return kind


def _check_int(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
        raise DataError(f"{name} must be a positive whole number, got {value!r}")


def _load_arrays(kind: str, paths: list[Path], split: str, num_classes: int | None,
                 class_names: Sequence[str] | None) -> tuple[Any, ...]:
    if kind == "npz":
        for p in paths:
            if not p.is_file():
                raise DataError(f"{p} is not a .npz file: pass the .npz part files themselves")
        parts = read_npz_parts(paths, num_classes=num_classes, class_names=class_names)
        return parts.x, parts.y, parts.class_names, parts.exact, paths, {"class_names_source": parts.class_names_source}
    finder, reader = ((cifar10.find_pickle_dir, cifar10.load_pickle_batches) if kind == "cifar10-pickle"
                      else (cifar10.find_binary_dir, cifar10.load_binary_batches))
    d = finder(paths[0])
    if d is None:
        want = cifar10.PICKLE_DIR if kind == "cifar10-pickle" else cifar10.BINARY_DIR
        raise DataError(f"{paths[0]} is not a {want} directory and does not contain one: "
                        f"point to the extracted CIFAR-10 archive")
    x, y, names, files = reader(d, split)
    return x, y, names, np.ones(len(y), dtype=bool), files, {}


def _load_images(kind: str, root: Path, split: str, attribute: str, image_size: int | tuple[int, int] | None,
                 limit: int | None, seed: int) -> tuple[Any, ...]:
    if kind == "celeba":
        layout = celeba.find_celeba(root)
        if layout is None:
            raise DataError(f"{root} is not a CelebA directory: it needs {celeba.IMAGE_DIR}/ and {celeba.ATTR_FILE}")
        sel = celeba.select_celeba(layout, split, attribute)
        names: tuple[str, ...] = (f"not_{sel.attribute}", sel.attribute)
        files = [layout.image_dir / f for f in sel.files]
        labels = sel.labels
        meta = [layout.attr_file] + ([layout.partition_file] if layout.partition_file else [])
        extra: dict[str, Any] = {"attribute": sel.attribute, "skipped_without_image": sel.skipped_without_image}
        image_size = image_size or celeba.DEFAULT_IMAGE_SIZE
        base = layout.image_dir
    else:
        if not root.is_dir():
            raise DataError(f"image folder {root} is not a directory: lay it out as <root>/<class_name>/*.png")
        names, files, label_list = folder.list_image_folder(root)
        labels = np.asarray(label_list, dtype=np.int64)
        meta, extra, base = [], {}, root
    if limit is not None:
        idx = stratified_indices(labels, limit, seed)
        files, labels = [files[i] for i in idx], labels[idx]
    x, digests = read_images(files, image_size)
    rel = [f.relative_to(base).as_posix() for f in files]
    extra["images_sha256"] = files_digest(rel, digests)
    extra["n_image_files"] = len(files)
    return x, labels, names, None, meta, extra


def load_dataset(paths: Sequence[str | Path] | str | Path, *, kind: str = "auto", split: str = "train",
                 image_size: int | tuple[int, int] | None = None, attribute: str = "Smiling", exact_only: bool = False,
                 limit: int | None = None, seed: int = 0, num_classes: int | None = None,
                 class_names: Sequence[str] | None = None) -> ImageArrays:
    """Load a labelled image set from disk as uint8 NHWC RGB pixels and int64 labels.

    ``paths``: one data set — a CIFAR-10 pickle or binary directory, a CelebA directory, an
    image folder, or one or more ``.npz`` parts concatenated in order. ``kind`` forces a layout
    (see :data:`KINDS`); ``"auto"`` detects it. ``split`` selects ``train``/``test`` for
    CIFAR-10 and ``train``/``valid``/``test``/``all`` for CelebA; an ``.npz`` file or an image
    folder is one split already (``split`` is then not recorded). ``image_size`` resizes every
    image to that square size in pixels (centre crop to a square, ``cv2.INTER_AREA``), or to
    ``(height, width)`` (centre crop to that aspect ratio); CelebA defaults to 64, others keep
    their size. ``attribute`` is the CelebA attribute used as a two-class label. ``exact_only``
    keeps only images whose ``exact`` flag is True (the
    ``*_jpegfill`` CIFAR-10 files; other sources count as exact). ``limit`` keeps a
    stratified subset of that many images chosen with ``seed`` (before decoding, for image
    files). ``num_classes`` / ``class_names`` declare the class list (default: the enclosing
    :func:`declared_classes`): a label outside it is refused, and so are ``.npz`` labels that
    leave classes without images when nothing is declared. Nothing is ever downloaded; every
    failure raises :class:`DataError`.
    """
    resolved = _as_paths(paths)
    for side in (image_size if isinstance(image_size, tuple) else (image_size,)):
        _check_int("image_size", side)
    _check_int("limit", limit)
    if num_classes is None and class_names is None:
        num_classes, class_names = _DECLARED.get()
    kind = _resolve_kind(resolved, kind)
    if kind in ("celeba", "folder"):
        x, y, names, exact, meta_files, extra = _load_images(kind, resolved[0], split, attribute, image_size, limit,
                                                             seed)
    else:
        x, y, names, exact, meta_files, extra = _load_arrays(kind, resolved, split, num_classes, class_names)
    declared = declared_names(num_classes, class_names)
    if kind == "folder" and class_names is not None and set(names) == set(class_names) \
            and len(set(class_names)) == len(class_names):
        # --classes names the folders in the order of the model's outputs: label i is output i
        order = {n: i for i, n in enumerate(class_names)}
        y = np.asarray([order[names[int(label)]] for label in y], dtype=np.int64)
        names = tuple(class_names)
    if kind != "npz" and declared is not None and (len(names) != len(declared) or
                                                   (class_names is not None and tuple(names) != declared)):
        raise DataError(f"{resolved[0]} ({kind}) has the {len(names)} classes {list(names)[:4]}…, not the declared "
                        f"{list(declared)[:4]}… ({len(declared)}): drop --classes/--num-classes or fix them")
    if kind not in ("celeba", "folder"):
        if exact_only and exact is not None:
            x, y, exact = x[exact], y[exact], exact[exact]
        if limit is not None:
            idx = stratified_indices(y, limit, seed)
            x, y = x[idx], y[idx]
            exact = None if exact is None else exact[idx]
        if image_size is not None:
            x = fit_all(x, image_size)
    if len(y) == 0:
        raise DataError(f"no images left in {', '.join(map(str, resolved))}"
                        f"{' after exact_only' if exact_only else ''}: use another data set or drop exact_only")
    h, w = x.shape[1:3]
    provenance: dict[str, Any] = {
        "kind": kind,
        "paths": [str(p) for p in resolved],
        "files": {str(f): sha256_file(f) for f in meta_files},
        "n": len(y),
        "split": split if kind in ("cifar10-pickle", "cifar10-binary", "celeba") else None,
        "attribute": None,
        "image_size": int(h) if h == w else [int(h), int(w)],
        "channels": int(x.shape[3]),
        "exact_only": exact_only,
        "n_exact": None if exact is None else int(exact.sum()),
        "limit": limit,
        "seed": seed,
        "class_counts": np.bincount(y, minlength=len(names)).tolist(),
        **extra,
    }
    return ImageArrays(x, y, tuple(names), provenance, exact)
