"""Data set loaders of the training subsystem (docs/training.md, "Data"): CIFAR-10 (pickle and binary batches),
``.npz`` arrays, CelebA (one binary attribute) and plain image folders, all read into
:class:`ImageArrays` (uint8 NHWC RGB, int64 labels, provenance).

The loaders need numpy and OpenCV only; ``to_tensor`` and ``iterate_batches`` live in
:mod:`ism_edge_training.data.torch_utils`, the one module here that imports torch, and are imported
from it on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ism_edge_training.data.arrays import ImageArrays, stratified_indices
from ism_edge_training.data.cifar10 import CIFAR10_CLASSES
from ism_edge_training.data.load import KINDS, declared_classes, detect_kind, load_dataset

if TYPE_CHECKING:
    from ism_edge_training.data.torch_utils import iterate_batches, to_tensor

__all__ = [
    "CIFAR10_CLASSES",
    "KINDS",
    "ImageArrays",
    "declared_classes",
    "detect_kind",
    "iterate_batches",
    "load_dataset",
    "stratified_indices",
    "to_tensor",
]


def __getattr__(name: str) -> Any:
    if name in ("to_tensor", "iterate_batches"):
        from ism_edge_training.data import torch_utils

        return getattr(torch_utils, name)
    raise AttributeError(f"module 'ism_edge_training.data' has no attribute {name!r}")
