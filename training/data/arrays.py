"""In-memory labelled image sets (uint8 NHWC RGB pixels, int64 labels) and stratified selection."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ism_edge.errors import DataError


def stratified_indices(y: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``k`` samples drawn so that each class keeps its share of ``y``.

    Per-class counts are ``k · n_c / N`` rounded by the largest-remainder rule (ties go to the
    lower class index), so they sum to exactly ``k``; the samples inside a class are chosen
    uniformly at random by ``numpy.random.default_rng(seed)``. Deterministic for fixed inputs.
    """
    y = np.asarray(y)
    n = len(y)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * (k / n)
    take = np.floor(quota).astype(np.int64)
    order = np.lexsort((classes, -(quota - take)))
    take[order[: k - int(take.sum())]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(y == c))[:t] for c, t in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"provenance value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def _indices_digest(idx: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(idx, dtype="<i8").tobytes()).hexdigest()


@dataclass(frozen=True, eq=False)
class ImageArrays:
    """A labelled image set held in memory, with a record of where it came from.

    ``x`` is uint8 ``(N, H, W, C)``, RGB (C = 3) or grey (C = 1); ``ism_edge_training.data.torch_utils.to_tensor``
    turns it into float32 NCHW pixels in [0, 1]. ``y`` holds int64 indices into ``class_names``.
    ``provenance`` is a JSON-serialisable record (kind, absolute paths, per-file SHA-256, N,
    split, attribute, image size, selections applied) that ends up in the bundle manifest.
    ``exact`` marks images whose pixels are the dataset's original bytes (False for the
    JPEG-decoded fill of the CIFAR-10 ``*_jpegfill`` files); ``None`` where not recorded.
    """

    x: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]
    provenance: dict[str, Any]
    exact: np.ndarray | None = None

    def __post_init__(self) -> None:
        source = ", ".join(self.provenance.get("paths", [])) or "in-memory image arrays"
        x, y = self.x, self.y
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise DataError(f"{source}: images must be a uint8 array (N, H, W, C) with C = 1 or 3, "
                            f"got {getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
        if not isinstance(y, np.ndarray) or y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{source}: labels must be an integer array of shape ({len(x)},), "
                            f"got {getattr(y, 'dtype', type(y).__name__)} {getattr(y, 'shape', '')}")
        names = tuple(str(c) for c in self.class_names)
        if not names:
            raise DataError(f"{source}: no class names")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(names)):
            raise DataError(f"{source}: labels span {int(y.min())}..{int(y.max())} but there are "
                            f"{len(names)} class names; fix the labels or the class names")
        if self.exact is not None:
            e = self.exact
            if not isinstance(e, np.ndarray) or e.dtype != np.bool_ or e.shape != (len(x),):
                raise DataError(f"{source}: 'exact' must be a bool array of shape ({len(x)},), "
                                f"got {getattr(e, 'dtype', type(e).__name__)} {getattr(e, 'shape', '')}")
        object.__setattr__(self, "y", y.astype(np.int64, copy=False))
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "provenance", json.loads(json.dumps(self.provenance, default=_jsonable)))

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:
        return (f"ImageArrays(n={len(self)}, shape={tuple(self.x.shape[1:])}, classes={len(self.class_names)}, "
                f"kind={self.provenance.get('kind')!r})")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> np.ndarray:
        """Number of images of each class, in ``class_names`` order."""
        return np.bincount(self.y, minlength=self.num_classes)

    def _select(self, idx: np.ndarray, record: dict[str, Any]) -> ImageArrays:
        prov = dict(self.provenance)
        prov["selection"] = [*prov.get("selection", []), record]
        prov["n"] = len(idx)
        prov["class_counts"] = np.bincount(self.y[idx], minlength=self.num_classes).tolist()
        exact = None if self.exact is None else self.exact[idx]
        return ImageArrays(self.x[idx], self.y[idx], self.class_names, prov, exact)

    def subset(self, idx: Any) -> ImageArrays:
        """The images at integer positions ``idx`` (or where the bool mask ``idx`` is True), in that order."""
        idx = np.asarray(idx)
        if idx.dtype == np.bool_:
            if idx.shape != (len(self),):
                raise DataError(f"a subset mask must have shape ({len(self)},), got {idx.shape}")
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = idx.astype(np.int64)
        elif not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 1:
            raise DataError(f"subset indices must be a 1-D integer array or a bool mask, got {idx.dtype} {idx.shape}")
        elif idx.min() < -len(self) or idx.max() >= len(self):
            raise DataError(f"subset indices span {idx.min()}..{idx.max()} but there are only {len(self)} images")
        return self._select(idx, {"op": "subset", "n": len(idx), "indices_sha256": _indices_digest(idx)})

    def split(self, fraction: float, seed: int = 0) -> tuple[ImageArrays, ImageArrays]:
        """Split off a stratified, deterministic held-out part: returns ``(rest, held_out)``.

        ``held_out`` holds ``round(fraction · N)`` images with every class in proportion (see
        :func:`stratified_indices`); both parts keep the original order. Used for the
        calibration set of the detectors' thresholds (docs/training.md: calibration).
        """
        if not 0.0 < fraction < 1.0:
            raise DataError(f"held-out fraction must lie strictly between 0 and 1, got {fraction}")
        k = int(round(fraction * len(self)))
        if k == 0 or k == len(self):
            raise DataError(f"a held-out fraction of {fraction} of {len(self)} images leaves one part empty: "
                            f"use more images or another fraction")
        held = stratified_indices(self.y, k, seed)
        mask = np.zeros(len(self), dtype=bool)
        mask[held] = True
        rest = np.flatnonzero(~mask)
        base = {"op": "split", "fraction": fraction, "seed": seed}
        return (self._select(rest, {**base, "part": "rest"}),
                self._select(held, {**base, "part": "held_out"}))
