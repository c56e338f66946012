"""Square Attack, L∞ (Andriushchenko, Croce, Flammarion & Hein 2020): score-based black-box."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ism_edge_training.attacks.base import (
    Attack,
    check_int,
    check_positive,
    check_seed,
    make_generator,
    project,
)


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample margin z_y − max_{j≠y} z_j; negative once the sample is misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - others.max(dim=1).values


def p_selection(p_init: float, it: int, n_iters: int) -> float:
    """Fraction of pixels changed at iteration ``it``: the paper's piecewise-halving schedule."""
    it = int(it / n_iters * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
                       (6000, 128), (8000, 256), (10000, 512)):
        if it <= bound:
            return p_init / div
    return p_init


class SquareAttack(Attack):
    """Untargeted L∞ Square Attack: random search over square-shaped updates, logits only.

    Starts from vertical stripes of ±ε, then for up to ``n_queries`` − 1 iterations proposes,
    for every still correctly classified sample, a random s×s window set to ±ε per channel
    (s from the fraction ``p_init`` of pixels, halved on the paper's schedule) and keeps it when
    the margin loss decreases. Queries only the model's logits (no gradients); a sample costs
    one query per iteration until it is misclassified. Pixels in [0, 1], ε on that scale.
    """

    def __init__(self, model: nn.Module, eps: float, *, n_queries: int = 5000, p_init: float = 0.8,
                 seed: int | None = None) -> None:
        super().__init__(model, eps)
        self.n_queries = check_int(n_queries, "n_queries", 1)
        self.p_init = check_positive(p_init, "p_init")
        if self.p_init > 1:
            raise ValueError(f"p_init must be in (0, 1] (fraction of pixels changed at first), got {p_init!r}")
        self.seed = check_seed(seed)

    def _options(self) -> dict[str, Any]:
        return {"eps": self.eps, "n_queries": self.n_queries, "p_init": self.p_init, "seed": self.seed}

    def _signs(self, shape: tuple[int, ...], gen: torch.Generator | None, x: Tensor) -> Tensor:
        return torch.randint(0, 2, shape, generator=gen, device=x.device).to(x.dtype) * 2 - 1

    @torch.no_grad()
    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        if self.eps == 0 or x.shape[0] == 0:
            return x.clone()
        gen = make_generator(self.seed, x.device)
        n, c, h, w = x.shape
        eps = self.eps
        x_best = project(x + eps * self._signs((n, c, 1, w), gen, x), x, eps)
        margin = margin_loss(self.model(x_best), y)
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        for it in range(self.n_queries - 1):
            idx = (margin > 0).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xa, xb = x[idx], x_best[idx]
            m = idx.numel()
            s = int(round(math.sqrt(p_selection(self.p_init, it, self.n_queries) * h * w)))
            s = min(max(s, 1), h - 1)
            top = torch.randint(0, h - s, (m,), generator=gen, device=x.device)
            left = torch.randint(0, w - s, (m,), generator=gen, device=x.device)
            in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + s)
            in_cols = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + s)
            window = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
            signs = self._signs((m, c, 1, 1), gen, x)
            for _ in range(10):  # resample windows that would not change the image (as the paper does)
                cand = project(torch.where(window, xa + eps * signs, xb), xa, eps)
                unchanged = ((cand - xb).abs() < 1e-7).flatten(1).all(dim=1)
                if not bool(unchanged.any()):
                    break
                signs = torch.where(unchanged[:, None, None, None], self._signs((m, c, 1, 1), gen, x), signs)
            new_margin = margin_loss(self.model(cand), y[idx])
            better = new_margin < margin[idx]
            x_best[idx[better]] = cand[better]
            margin[idx[better]] = new_margin[better]
        return x_best
