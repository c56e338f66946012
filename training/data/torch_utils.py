"""From :class:`ImageArrays` to PyTorch batches; the only module of ``ism_edge_training.data`` that imports torch."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ism_edge.errors import DataError
from ism_edge_training.data.arrays import ImageArrays

PAD = 4


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 NHWC pixels → float32 NCHW pixels in [0, 1] (divided by 255), on the CPU."""
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
        raise DataError(f"to_tensor expects uint8 images of shape (N, H, W, C), got "
                        f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def augment_batch(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random crop with 4-pixel reflect padding plus random horizontal flip, for a uint8 NHWC batch.

    The standard CIFAR augmentation (He et al., "Deep Residual Learning for Image
    Recognition", 2016), vectorised: one gather for all crops, one for all flips.
    """
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)), mode="reflect")
    dy = np.asarray(rng.integers(0, 2 * PAD + 1, size=n))
    dx = np.asarray(rng.integers(0, 2 * PAD + 1, size=n))
    cols = dx[:, None] + np.arange(w)[None, :]
    flip = rng.random(n) < 0.5
    cols[flip] = cols[flip, ::-1]
    rows = dy[:, None] + np.arange(h)[None, :]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def iterate_batches(arrays: ImageArrays, batch_size: int, *, shuffle: bool, seed: int = 0,
                    augment: bool = False,
                    device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches: x float32 NCHW in [0, 1], y int64, both on ``device``.

    Every image is seen once; the last batch may be smaller. ``shuffle`` permutes the order
    and ``augment`` applies :func:`augment_batch`, both drawn from ``seed`` (pass a new seed
    each epoch for new draws). Pixels travel to the device as uint8 and are converted there.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch size must be a positive whole number, got {batch_size!r}")
    dev = torch.device(device)
    order_rng, aug_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    order = order_rng.permutation(len(arrays)) if shuffle else np.arange(len(arrays))
    non_blocking = dev.type == "cuda"
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        xb = arrays.x[idx]
        if augment:
            xb = augment_batch(xb, aug_rng)
        xt = torch.from_numpy(np.ascontiguousarray(xb))
        yt = torch.from_numpy(arrays.y[idx])
        if non_blocking:
            xt, yt = xt.pin_memory(), yt.pin_memory()
        xt = xt.to(dev, non_blocking=non_blocking).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
        yield xt, yt.to(dev, non_blocking=non_blocking)
