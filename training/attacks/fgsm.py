"""FGSM: the fast gradient sign method (Goodfellow, Shlens & Szegedy 2015), L∞."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ism_edge_training.attacks.base import Attack, input_gradient


class FGSM(Attack):
    """One step of size ε along the sign of the cross-entropy gradient: x' = x + ε·sign(∇ₓ CE).

    Untargeted, L∞, inputs float32 NCHW pixels in [0, 1], ε on that scale (e.g. 8/255).
    """

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        x = x.clone().requires_grad_(True)
        loss = F.cross_entropy(self.model(x), y, reduction="sum")
        return x.detach() + self.eps * input_gradient(loss, x).sign()
