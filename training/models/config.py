"""Model configuration: one frozen dataclass, named presets, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ism_edge.errors import BundleError

# CIFAR-10 channel statistics; normalisation lives inside the classifier (inputs are [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CELEBA_MEAN = (0.5063, 0.4258, 0.3832)
CELEBA_STD = (0.3106, 0.2904, 0.2897)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of every network of the defense.

    ``clf_widths``/``clf_dense``: classifier C (paper Table 1: 128, 256, 128, 64 and 1024).
    ``clf_rank``: 0 for the paper's dense layer; r > 0 factors it into two, flat → r (no bias)
    → dense, which holds almost all of C's weights otherwise (medium: 4.2 M of 4.3 M).
    ``map_widths``/``latent_dim``/``sparsity_k``: mapping network M (paper Table 2: 64, 128,
    256, 256 and FC 128; k = 32 largest-magnitude latent entries kept per instance).
    ``map_skip``: a residual decoder path (not in the paper; off in its preset): M's encoder
    features at a quarter of the input resolution are added, through a 1×1 convolution, to the
    decoder's at the same resolution (U-Net style), so that M keeps detail its sparse code cannot
    carry. ``pert_widths``: perturbation classifier P; ``disc_widths``: discriminator D.
    ``image_size`` must be a multiple of 16 (M has four stride-2 stages) and at least 32.
    """

    image_size: int = 32
    channels: int = 3
    num_classes: int = 10
    clf_widths: tuple[int, int, int, int] = (128, 256, 128, 64)
    clf_dense: int = 1024
    clf_rank: int = 0
    map_widths: tuple[int, int, int, int] = (64, 128, 256, 256)
    latent_dim: int = 128
    sparsity_k: int = 32
    map_skip: bool = False
    pert_widths: tuple[int, int, int] = (32, 64, 128)
    disc_widths: tuple[int, int, int] = (64, 128, 256)
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD

    def __post_init__(self) -> None:
        if self.image_size < 32 or self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 and >= 32, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if not 0 <= self.clf_rank <= self.clf_dense:
            raise ValueError(f"clf_rank must be 0 (full) or in [1, clf_dense={self.clf_dense}], got {self.clf_rank}")
        if not 1 <= self.sparsity_k <= self.latent_dim:
            raise ValueError(f"sparsity_k must be in [1, latent_dim={self.latent_dim}], got {self.sparsity_k}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std must have one entry per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std entries must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise BundleError(f"model config has unknown fields {sorted(unknown)}: written by a newer ism-edge?")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)


# CelebA-style inputs: a binary attribute, wider latent code (256, k = 64).
_CELEBA = ModelConfig(
    image_size=64,
    num_classes=2,
    clf_widths=(64, 128, 64, 32),
    clf_dense=512,
    map_widths=(32, 64, 128, 128),
    latent_dim=256,
    sparsity_k=64,
    pert_widths=(16, 32, 64),
    disc_widths=(32, 64, 128),
    mean=CELEBA_MEAN,
    std=CELEBA_STD,
)

PRESETS: dict[str, ModelConfig] = {
    # The paper's sizes at 32×32 (Tables 1 and 2).
    "paper": ModelConfig(),
    # Same structure, narrower: trains on 2 CPU cores in minutes.
    "small": ModelConfig(
        clf_widths=(16, 32, 32, 16),
        clf_dense=128,
        map_widths=(16, 32, 64, 64),
        latent_dim=128,
        sparsity_k=32,
        pert_widths=(16, 32, 32),
        disc_widths=(16, 32, 64),
    ),
    # Twice small's widths, a wider latent code and M's residual decoder path: the shipped
    # CIFAR-10 defense, whose whole recipe trains on all 50,000 images within hours on 2 CPU
    # cores (docs/training.md).
    "medium": ModelConfig(
        clf_widths=(32, 64, 64, 32),
        clf_dense=512,
        map_widths=(32, 64, 128, 128),
        latent_dim=256,
        sparsity_k=64,
        map_skip=True,
        pert_widths=(16, 32, 64),
        disc_widths=(32, 64, 128),
    ),
    # CelebA-style inputs (binary attribute by default).
    "celeba64": _CELEBA,
    "celeba128": replace(_CELEBA, image_size=128),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Return the named preset, with fields overridden (e.g. ``num_classes=2``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)
