"""The defense's networks: classifier C, mapping network M, discriminator D, perturbation classifier P.

All take float32 NCHW pixels in [0, 1]. Normalisation lives inside C, so exported graphs take
raw [0, 1] pixels too.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ism_edge_training.models.config import ModelConfig


class Classifier(nn.Module):
    """Classifier C of the paper's Table 1; returns logits (apply softmax at T outside).

    Conv(w0,3×3)-ReLU-Conv(w1,3×3)-ReLU-MaxPool(2)-BN-Conv(w2,3×3)-ReLU-Conv(w3,3×3)-ReLU-
    Flatten-Dense(dense)-ReLU-Dense(num_classes). Convolutions are 'same'-padded. Inputs larger
    than 32×32 are average-pooled to 16×16 after the max-pool so the dense layer keeps the
    paper's size. With ``cfg.clf_rank`` > 0 the first dense layer is factored in two
    (flat → rank, no bias → dense): the same function class restricted to rank ``clf_rank``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w0, w1, w2, w3 = cfg.clf_widths
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1))
        reduce = cfg.image_size // 32
        self.features = nn.Sequential(
            nn.Conv2d(cfg.channels, w0, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w0, w1, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(w1),
            *([nn.AvgPool2d(reduce)] if reduce > 1 else []),
            nn.Conv2d(w1, w2, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w2, w3, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        flat = w3 * 16 * 16
        dense: list[nn.Module] = ([nn.Linear(flat, cfg.clf_rank, bias=False), nn.Linear(cfg.clf_rank, cfg.clf_dense)]
                                  if cfg.clf_rank else [nn.Linear(flat, cfg.clf_dense)])
        self.head = nn.Sequential(
            nn.Flatten(),
            *dense,
            nn.ReLU(inplace=True),
            nn.Linear(cfg.clf_dense, cfg.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - self.mean) / self.std))


def factor_classifier(clf: Classifier, cfg: ModelConfig, rank: int) -> tuple[Classifier, float]:
    """``clf`` with its first dense layer factored to rank ``rank`` by truncated SVD.

    W = U S Vᵀ becomes two layers, √S·Vᵀ (no bias) then U·√S with W's bias: the best rank-``rank``
    approximation of W (Eckart–Young), split evenly so that neither factor's scale overflows
    float16. Returns the new classifier (``cfg`` with ``clf_rank=rank``) and the relative
    Frobenius error ‖W − W_r‖ / ‖W‖. Every other weight is copied unchanged.
    """
    if cfg.clf_rank:
        raise ValueError(f"the classifier's dense layer is already factored (rank {cfg.clf_rank})")
    out = Classifier(replace(cfg, clf_rank=rank))
    out.features.load_state_dict(clf.features.state_dict())
    out.head[-1].load_state_dict(clf.head[-1].state_dict())
    out.mean.copy_(clf.mean)
    out.std.copy_(clf.std)
    dense = clf.head[1]
    assert isinstance(dense, nn.Linear)
    w = dense.weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    first, second = out.head[1], out.head[2]
    assert isinstance(first, nn.Linear) and isinstance(second, nn.Linear)
    with torch.no_grad():
        first.weight.copy_((root[:, None] * vh[:rank]).float())
        second.weight.copy_((u[:, :rank] * root[None, :]).float())
        second.bias.copy_(dense.bias)
    error = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
    return out.train(clf.training), error


def k_sparse(z: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest-magnitude entries of each row of ``z`` and zero the rest.

    The instance-sparsity step of the mapping network: every instance gets its own support.
    Gradients flow to the kept entries (the selection itself is piecewise constant).
    """
    idx = z.abs().topk(k, dim=1).indices
    return torch.zeros_like(z).scatter(1, idx, z.gather(1, idx))


class MappingNetwork(nn.Module):
    """Instance sparsity mapping network M (paper Table 2): a MagNet-style autoencoder.

    Encoder Conv(w0,7×7,s2)-LReLU(0.2)-Conv(w1,3×3,s2)-LReLU-Conv(w2,3×3,s2)-LReLU-
    Conv(w3,5×5,s2)-FC(latent) → z, then the k-sparse code, then a mirrored decoder of
    transposed convolutions ending in a sigmoid: x̂ = M(x) at the input resolution, in [0, 1].
    With ``cfg.map_skip`` the encoder's features after its second stage (¼ resolution) are added
    through a 1×1 convolution to the decoder's after its second stage (see :class:`ModelConfig`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w0, w1, w2, w3 = cfg.map_widths
        self.k = cfg.sparsity_k
        self.grid = cfg.image_size // 16
        flat = w3 * self.grid * self.grid
        self.encoder = nn.Sequential(
            nn.Conv2d(cfg.channels, w0, 7, stride=2, padding=3),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w0, w1, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w1, w2, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w2, w3, 5, stride=2, padding=2),
            nn.Flatten(),
            nn.Linear(flat, cfg.latent_dim),
        )
        self.fc = nn.Linear(cfg.latent_dim, flat)
        self.w3 = w3
        self.decoder = nn.Sequential(
            nn.LeakyReLU(0.2, inplace=True),
            nn.ConvTranspose2d(w3, w2, 5, stride=2, padding=2, output_padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.ConvTranspose2d(w2, w1, 3, stride=2, padding=1, output_padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.ConvTranspose2d(w1, w0, 3, stride=2, padding=1, output_padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.ConvTranspose2d(w0, cfg.channels, 7, stride=2, padding=3, output_padding=1),
            nn.Sigmoid(),
        )
        self.skip = nn.Conv2d(w1, w1, 1) if cfg.map_skip else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent z (before sparsification)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], self.w3, self.grid, self.grid)
        if self.skip is None:
            return self.decoder(h)
        if skip is None:
            raise ValueError("this mapping network has a residual path: decode needs the encoder's features")
        h = self.decoder[:4](h)  # two stages: ¼ resolution, w1 channels
        return self.decoder[4:](h + self.skip(skip))

    def forward_with_code(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (x̂, sparse code); the code feeds the L1 sparsity penalty during training."""
        if self.skip is None:
            z = k_sparse(self.encode(x), self.k)
            return self.decode(z), z
        quarter = self.encoder[:4](x)  # two stride-2 stages
        z = k_sparse(self.encoder[4:](quarter), self.k)
        return self.decode(z, quarter), z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_code(x)[0]


class Discriminator(nn.Module):
    """Discriminator D: tells clean images (real) from M's outputs (fake); returns a logit."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w0, w1, w2 = cfg.disc_widths
        self.net = nn.Sequential(
            nn.Conv2d(cfg.channels, w0, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w0, w1, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w1, w2, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(w2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


class PerturbationClassifier(nn.Module):
    """Perturbation classifier P: a small CNN on the residual r = x − M(x); returns a logit.

    P(attacked) = sigmoid(logit). The residual is scaled by a fixed gain so that typical
    perturbation magnitudes (a few /255) reach the convolutions at unit scale.
    """

    gain = 10.0

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w0, w1, w2 = cfg.pert_widths
        self.net = nn.Sequential(
            nn.Conv2d(cfg.channels, w0, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w0, w1, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w1, w2, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(w2, 1),
        )

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        return self.net(residual * self.gain).squeeze(1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def init_weights(module: nn.Module) -> None:
    """Kaiming-uniform convolutions and linears (PyTorch default) with zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def sparse_l1(z: torch.Tensor) -> torch.Tensor:
    """Mean L1 norm of the latent code per instance (the sparsity penalty)."""
    return z.abs().sum(dim=1).mean()


def reconstruction_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute error ‖x − x̂‖₁ / (C·H·W): MagNet's reconstruction detector."""
    return (x - x_hat).abs().flatten(1).mean(dim=1)


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample JSD between softmax(a/T) and softmax(b/T); same formula as ism_edge.scores.jsd.

    In float64, as the runtime computes it: in float32 the two KL terms of nearly equal
    distributions cancel to ±1e-7 noise, and a threshold calibrated on that noise makes PyTorch
    and the engines disagree on flags that neither computes meaningfully.
    """
    p = F.softmax(logits_a.double() / temperature, dim=1)
    q = F.softmax(logits_b.double() / temperature, dim=1)
    m = 0.5 * (p + q)
    eps = 1e-12
    kl_pm = (p * ((p + eps).log() - (m + eps).log())).sum(dim=1)
    kl_qm = (q * ((q + eps).log() - (m + eps).log())).sum(dim=1)
    return (0.5 * (kl_pm + kl_qm)).to(logits_a.dtype)


class ScaledLogits(nn.Module):
    """``model(x) * scale``: the attack target for a distilled classifier.

    A classifier distilled at temperature T and deployed at T = 1 has logits ~T times larger, so
    softmax saturates and cross-entropy gradients vanish in float32 — gradient masking, not
    robustness (Carlini & Wagner 2016). Attacking ``logits / T`` leaves the argmax unchanged and
    restores useful gradients; every attack in training and evaluation targets this wrapper.
    """

    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__()
        self.model = model
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.scale
