"""Real images for parity checks and INT8 calibration, at any model input size.

The committed CIFAR-10 samples serve 32×32 bundles as they are. Other sizes use the committed real
photos (``data/samples/photos/``) and CelebA faces (``data/samples/celeba/img_align_celeba/``)
resized to the model input, topped up with resized CIFAR-10 images when there are fewer than
asked for (real pixels either way; never random noise). Odd-numbered files serve parity, even
ones calibration, so the two never share an image.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ism_edge.errors import DataError

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "data" / "samples"
_PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def real_samples(
    input_shape: tuple[int, int, int],
    n: int,
    *,
    split: str = "test",
    samples_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, str]:
    """Return ``(x, source)``: ``n`` real images as float32 NCHW pixels in [0, 1] of ``input_shape``.

    ``split`` is ``"test"`` (parity checks) or ``"train"`` (INT8 calibration): calibration and
    parity never see the same images. ``source`` describes where the pixels came from.
    """
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    c, h, w = input_shape
    root = Path(samples_dir) if samples_dir is not None else SAMPLES_DIR
    images: list[np.ndarray] = []
    parts: list[str] = []
    if (h, w) != (32, 32):
        files = [p for folder in (root / "photos", root / "celeba" / "img_align_celeba") if folder.is_dir()
                 for p in sorted(folder.iterdir()) if p.suffix.lower() in _PHOTO_SUFFIXES]
        chosen = files[1::2] if split == "test" else files[0::2]
        images = [_read_rgb(p) for p in chosen[:n]]
        if images:
            parts.append(f"{len(images)} photos/CelebA images from {root}")
    if len(images) < n:
        npz = root / "cifar10" / f"{split}.npz"
        if not npz.is_file():
            raise DataError(f"{npz} is missing: parity and calibration need the committed real samples under {root}")
        with np.load(npz) as z:
            x = z["x"][: n - len(images)]
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
            raise DataError(f"{npz} holds {x.dtype} {x.shape}, expected uint8 NHWC RGB images")
        images.extend(x)
        parts.append(f"{len(x)} CIFAR-10 {split} images from {npz}")
    source = " + ".join(parts) + ("" if (h, w) == (32, 32) else f", resized to {h}x{w}")
    batch = np.stack([_to_chw(img, c, h, w) for img in images]).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(batch), source


def _read_rgb(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path} cannot be decoded as an image: remove it from {path.parent}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _to_chw(rgb: np.ndarray, c: int, h: int, w: int) -> np.ndarray:
    import cv2

    if rgb.shape[:2] != (h, w):
        shrink = rgb.shape[0] > h or rgb.shape[1] > w
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    if c == 1:
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[None]
    return rgb.transpose(2, 0, 1)
