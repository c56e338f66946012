"""PGD: projected gradient descent with random start (Madry et al. 2018), L∞."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ism_edge_training.attacks.base import (
    Attack,
    check_int,
    check_positive,
    check_seed,
    input_gradient,
    make_generator,
    project,
    random_start,
)


class PGD(Attack):
    """L∞ PGD on the cross-entropy loss (Madry, Makelov, Schmidt, Tsipras & Vladu 2018).

    ``steps`` iterations of x ← Π(x + α·sign(∇ₓ CE)), Π the projection onto the ε-ball around
    the clean input and onto [0, 1]; ``alpha`` defaults to 2.5·ε/steps (Madry et al.);
    ``random_start`` starts from a uniform point of the ε-ball. With ``restarts`` > 1 every
    sample keeps the first restart that misclassifies it, else the restart with the highest
    loss; ``__call__(x, y, start=…)`` adds a run from given examples (nested budgets). ``seed``
    makes the random starts repeatable. Pixels in [0, 1], ε on that scale.
    """

    supports_start = True

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        *,
        steps: int = 10,
        alpha: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        seed: int | None = None,
    ) -> None:
        super().__init__(model, eps)
        self.steps = check_int(steps, "steps", 1)
        self.alpha = 2.5 * self.eps / self.steps if alpha is None else check_positive(alpha, "alpha")
        if not isinstance(random_start, bool):
            raise ValueError(f"random_start must be True or False, got {random_start!r}")
        self.random_start = random_start
        self.restarts = check_int(restarts, "restarts", 1)
        if self.restarts > 1 and not random_start:
            raise ValueError(f"restarts={restarts} needs random_start=True (without it every restart is the same run)")
        self.seed = check_seed(seed)

    def _options(self) -> dict[str, Any]:
        return {"eps": self.eps, "steps": self.steps, "alpha": self.alpha, "random_start": self.random_start,
                "restarts": self.restarts, "seed": self.seed}

    def _run(self, x: Tensor, y: Tensor, gen: torch.Generator | None, first: Tensor | None = None) -> Tensor:
        if first is not None:
            x_adv = first.clone()
        else:
            x_adv = random_start(x, self.eps, gen) if self.random_start else x.clone()
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(self.model(x_adv), y, reduction="sum")
            step = self.alpha * input_gradient(loss, x_adv).sign()
            x_adv = project(x_adv.detach() + step, x, self.eps)
        return x_adv.detach()

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        gen = make_generator(self.seed, x.device)
        best = self._run(x, y, gen)
        if self.restarts == 1 and self._start is None:
            return best
        with torch.no_grad():
            logits = self.model(best)
            best_loss = F.cross_entropy(logits, y, reduction="none")
            best_fooled = logits.argmax(1) != y

        def consider(cand: Tensor) -> None:
            nonlocal best, best_loss, best_fooled
            with torch.no_grad():
                logits = self.model(cand)
                loss = F.cross_entropy(logits, y, reduction="none")
                fooled = logits.argmax(1) != y
            take = ~best_fooled & (fooled | (loss > best_loss))
            best = torch.where(take.view(-1, 1, 1, 1), cand, best)
            best_loss = torch.where(take, loss, best_loss)
            best_fooled = best_fooled | fooled

        for _ in range(self.restarts - 1):
            if bool(best_fooled.all()):
                break
            consider(self._run(x, y, gen))
        if self._start is not None and not bool(best_fooled.all()):
            # For the samples no random start fooled: one more run from the given examples
            # (Attack: start=), e.g. those of a smaller ε, which large steps from a random point
            # of a large ball can miss.
            consider(self._run(x, y, gen, self._start))
        return best
