"""The mapping network at any input size: pad to its stride plan, map, crop back.

:class:`~training.models.MappingNetwork` has four stride-2 stages and a dense bottleneck, so it
maps square images whose side is a multiple of 16. A user's classifier may take any size (48×48,
100×75, ...): :class:`PaddedMappingNetwork` pads its input on the bottom and right edges
(replicating the edge pixels, so the padding holds no new content for the detectors to see) to
the square side :func:`mapper_side` and crops M's output back. The reconstruction error and P's
residual are computed on the cropped image only, so the padding never counts in a score. The
weights are those of the plain network: the same safetensors layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ism_edge_training.models.config import ModelConfig
from ism_edge_training.models.networks import MappingNetwork


def mapper_side(height: int, width: int) -> int:
    """The square side M is built for, for inputs of ``height`` × ``width``: the larger side
    rounded up to a multiple of 16, at least 32 (what :class:`ModelConfig` accepts)."""
    return max(32, -(-max(height, width) // 16) * 16)


class PaddedMappingNetwork(MappingNetwork):
    """M for ``height`` × ``width`` inputs, built at ``cfg.image_size`` = :func:`mapper_side`."""

    def __init__(self, cfg: ModelConfig, height: int, width: int) -> None:
        super().__init__(cfg)
        if height > cfg.image_size or width > cfg.image_size:
            raise ValueError(f"a {height}x{width} input does not fit a mapper built for {cfg.image_size}")
        self.height, self.width = height, width
        self.pad = (0, cfg.image_size - width, 0, cfg.image_size - height)  # left, right, top, bottom

    def forward_with_code(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_hat, code = super().forward_with_code(F.pad(x, self.pad, mode="replicate"))
        return x_hat[:, :, : self.height, : self.width], code
