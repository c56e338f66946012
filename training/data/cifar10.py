"""CIFAR-10 in its two official on-disk formats (Krizhevsky, "Learning Multiple Layers of
Features from Tiny Images", 2009): the Python pickle batches and the binary batches.

Both hold 32×32 RGB images stored planar (all R, then G, then B; each channel row-major);
they are returned as uint8 NHWC RGB.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ism_edge.errors import DataError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PICKLE_DIR = "cifar-10-batches-py"
BINARY_DIR = "cifar-10-batches-bin"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
SPLITS = ("train", "test")
RECORD_BYTES = 1 + 3 * 32 * 32

try:
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer  # type: ignore[attr-defined]
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]


def _find(root: Path, dirname: str, suffix: str) -> Path | None:
    for d in (root, root / dirname):
        if (d / f"data_batch_1{suffix}").is_file() or (d / f"{TEST_BATCH}{suffix}").is_file():
            return d
    return None


def find_pickle_dir(root: Path) -> Path | None:
    """The ``cifar-10-batches-py`` directory at ``root`` or directly under it, if any."""
    return _find(root, PICKLE_DIR, "")


def find_binary_dir(root: Path) -> Path | None:
    """The ``cifar-10-batches-bin`` directory at ``root`` or directly under it, if any."""
    return _find(root, BINARY_DIR, ".bin")


def _batch_files(d: Path, split: str, suffix: str, archive: str) -> list[Path]:
    if split not in SPLITS:
        raise DataError(f"split {split!r} does not exist in CIFAR-10 ({d}): use 'train' or 'test'")
    names = TRAIN_BATCHES if split == "train" else (TEST_BATCH,)
    files = [d / f"{n}{suffix}" for n in names]
    for f in files:
        if not f.is_file():
            raise DataError(f"CIFAR-10 batch {f} is missing: a complete {d.name} directory holds "
                            f"data_batch_1..5{suffix} and {TEST_BATCH}{suffix}; re-extract {archive}")
    return files


def _planar_to_nhwc(rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _check_labels(labels: np.ndarray, n_classes: int, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(f"CIFAR-10 batch {path} has labels {labels.min()}..{labels.max()}, outside 0..{n_classes - 1}: "
                        f"the file is corrupt or not CIFAR-10")


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds (dicts, lists, strings, numpy arrays), so a
    tampered file cannot run code."""

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which a CIFAR-10 batch never does") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:120]}" if text else type(e).__name__


def unpickle_batch(path: Path) -> dict[str, Any]:
    """Read one CIFAR-10 pickle (Python-2 protocol 2, bytes keys) into a dict with str keys."""
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as e:
        raise DataError(f"CIFAR-10 pickle {path} is truncated or corrupt ({_one_line(e)}): "
                        f"re-extract cifar-10-python.tar.gz") from None
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR-10 pickle {path} holds a {type(obj).__name__}, not a batch dict: "
                        f"re-extract cifar-10-python.tar.gz")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read_pickle_batch(path: Path, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = unpickle_batch(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"CIFAR-10 pickle {path} has no uint8 'data' array of shape (N, 3072) "
                        f"(got {getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}): "
                        f"it is not a CIFAR-10 batch")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        y = np.zeros(0, dtype=np.int64)
    if y.shape != (len(data),):
        raise DataError(f"CIFAR-10 pickle {path} has {len(data)} images but 'labels' is "
                        f"{'missing' if labels is None else f'of length {len(y)}'}: it is not a CIFAR-10 batch")
    _check_labels(y, n_classes, path)
    return _planar_to_nhwc(data), y


def pickle_class_names(d: Path) -> tuple[str, ...]:
    """``label_names`` from ``batches.meta``, or the standard ten names when the file is absent."""
    meta = d / "batches.meta"
    if not meta.is_file():
        return CIFAR10_CLASSES
    names = unpickle_batch(meta).get("label_names")
    if not isinstance(names, list) or not names:
        raise DataError(f"CIFAR-10 metadata {meta} has no 'label_names' list: re-extract cifar-10-python.tar.gz")
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)


def load_pickle_batches(d: Path, split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], list[Path]]:
    """Images, labels, class names and the files read from a ``cifar-10-batches-py`` directory.

    ``split="train"`` reads ``data_batch_1`` … ``data_batch_5`` in order (50,000 images),
    ``"test"`` reads ``test_batch`` (10,000).
    """
    files = _batch_files(d, split, "", "cifar-10-python.tar.gz")
    names = pickle_class_names(d)
    parts = [_read_pickle_batch(f, len(names)) for f in files]
    meta = d / "batches.meta"
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), names,
            files + ([meta] if meta.is_file() else []))


def binary_class_names(d: Path) -> tuple[str, ...]:
    """Class names from ``batches.meta.txt`` (one per line), or the standard ten when it is absent."""
    meta = d / "batches.meta.txt"
    if not meta.is_file():
        return CIFAR10_CLASSES
    try:
        names = tuple(line.strip() for line in meta.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"CIFAR-10 metadata {meta} is unreadable ({_one_line(e)}): re-extract cifar-10-binary.tar.gz") from None
    if not names:
        raise DataError(f"CIFAR-10 metadata {meta} lists no class names: re-extract cifar-10-binary.tar.gz")
    return names


def _read_binary_batch(path: Path, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD_BYTES:
        raise DataError(f"CIFAR-10 binary batch {path} has {raw.size} bytes, not a positive multiple of "
                        f"{RECORD_BYTES} (1 label byte + 3072 pixel bytes per image): it is truncated or corrupt; "
                        f"re-extract cifar-10-binary.tar.gz")
    records = raw.reshape(-1, RECORD_BYTES)
    y = records[:, 0].astype(np.int64)
    _check_labels(y, n_classes, path)
    return _planar_to_nhwc(records[:, 1:]), y


def load_binary_batches(d: Path, split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], list[Path]]:
    """Images, labels, class names and the files read from a ``cifar-10-batches-bin`` directory.

    Each record is one label byte followed by 3072 planar pixel bytes.
    """
    files = _batch_files(d, split, ".bin", "cifar-10-binary.tar.gz")
    names = binary_class_names(d)
    parts = [_read_binary_batch(f, len(names)) for f in files]
    meta = d / "batches.meta.txt"
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), names,
            files + ([meta] if meta.is_file() else []))
