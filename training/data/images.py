"""Decoding image files with OpenCV and fitting them to a square model resolution."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from ism_edge.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def read_rgb(path: Path) -> tuple[np.ndarray, str]:
    """Decode one image file to uint8 HWC RGB; also return the SHA-256 of its bytes."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e.strerror or e}") from None
    img = cv2.imdecode(raw, cv2.IMREAD_COLOR) if raw.size else None
    if img is None:
        raise DataError(f"cannot decode image {path}: it is empty, corrupt or not a PNG/JPEG/BMP file; "
                        f"replace or remove it")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB), hashlib.sha256(raw.tobytes()).hexdigest()


def fit_square(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Centre-crop HWC ``img`` to a square (the shorter side) and resize it to ``size``×``size``.

    ``size`` may be ``(height, width)``: the crop then has that aspect ratio (the largest
    centred one), for a user's classifier of a non-square input. Resizing uses ``cv2.INTER_AREA``
    (pixel-area averaging, the alias-free choice for downscaling). An image of the right size
    is returned unchanged.
    """
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = img.shape[:2]
    ch, cw = (min(h, w), min(h, w)) if th == tw else (min(h, round(w * th / tw)), min(w, round(h * tw / th)))
    top, left = (h - ch) // 2, (w - cw) // 2
    img = img[top : top + ch, left : left + cw]
    if (ch, cw) != (th, tw):
        img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
        if img.ndim == 2:
            img = img[:, :, None]
    return img


def fit_all(x: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """:func:`fit_square` applied to every image of a uint8 NHWC batch."""
    th, tw = (size, size) if isinstance(size, int) else size
    if x.shape[1:3] == (th, tw):
        return x
    return np.stack([fit_square(img, size) for img in x]) if len(x) else np.zeros((0, th, tw, x.shape[3]), np.uint8)


def read_images(paths: Sequence[Path], image_size: int | tuple[int, int] | None) -> tuple[np.ndarray, list[str]]:
    """Decode ``paths`` into one uint8 NHWC RGB array (threads; OpenCV releases the GIL).

    With ``image_size`` every image goes through :func:`fit_square`; without it, all images
    must already share one size. Returns the array and the SHA-256 of each file's bytes.
    """
    def load(path: Path) -> tuple[np.ndarray, str]:
        img, digest = read_rgb(path)
        return (fit_square(img, image_size) if image_size is not None else img), digest

    out: np.ndarray | None = None
    digests: list[str] = []
    workers = max(1, min(8, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for i, (img, digest) in enumerate(pool.map(load, paths)):
            if out is None:
                out = np.empty((len(paths), *img.shape), dtype=np.uint8)
            elif img.shape != out.shape[1:]:
                raise DataError(f"image {paths[i]} is {img.shape[1]}x{img.shape[0]} but {paths[0]} is "
                                f"{out.shape[2]}x{out.shape[1]}: pass an image size to resize them all")
            out[i] = img
            digests.append(digest)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if out is None:
        raise DataError("no images to read")
    return out, digests


def files_digest(names: Sequence[str], digests: Sequence[str]) -> str:
    """One SHA-256 over ``name  sha256`` lines of the files a dataset was read from, in order."""
    h = hashlib.sha256()
    for name, digest in zip(names, digests, strict=True):
        h.update(f"{name}  {digest}\n".encode())
    return h.hexdigest()
