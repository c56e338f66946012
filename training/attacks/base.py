"""The attack base class (modelled on torchattacks' ``Attack``) and the BPDA helper.

Inputs are float32 NCHW pixels in [0, 1]; every ε is an L∞ bound on that scale; models return
logits. ``Attack.__call__`` puts the model (and every submodule) in eval mode, runs the subclass's
``perturb``, projects the result onto the ε-ball around x and onto [0, 1], and restores each
module's train/eval mode. Gradients are taken with ``torch.autograd.grad`` with respect to the
input only, so no ``.grad`` ever accumulates on model parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def check_eps(eps: float, name: str = "eps") -> float:
    """Validate an L∞ budget on the [0, 1] pixel scale; returns it as a float."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or not 0.0 <= eps <= 1.0:
        raise ValueError(
            f"{name} must be a finite number in [0, 1] (L∞ bound on [0, 1] pixels, e.g. 8/255), got {eps!r}")
    return float(eps)


def check_int(value: int, name: str, minimum: int) -> int:
    """Validate an integer option that must be at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_positive(value: float, name: str, *, allow_zero: bool = False) -> float:
    """Validate a finite positive (or non-negative) float option."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_seed(seed: int | None) -> int | None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be None or a non-negative integer, got {seed!r}")
    return seed


def project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Project ``x_adv`` onto the L∞ ε-ball around ``x``, then onto [0, 1] (idempotent)."""
    return torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)


def random_start(x: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
    """Uniform sample of the ε-ball around ``x`` intersected with [0, 1] (Madry et al. 2018)."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return project(x + (2.0 * noise - 1.0) * eps, x, eps)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator seeded with ``seed`` (fresh per call, so a seeded attack is repeatable)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


class BPDA(torch.autograd.Function):
    """``BPDA.apply(x, forward_fn)``: forward ``forward_fn(x)``, backward the identity (see :func:`bpda`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, forward_fn: Callable[[Tensor], Tensor]) -> Tensor:  # type: ignore[override]
        out = forward_fn(x)
        if out.shape != x.shape:
            raise ValueError(f"BPDA with an identity backward needs an output of the input's shape {tuple(x.shape)}, "
                             f"got {tuple(out.shape)}")
        return out.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def bpda(forward_fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Backward Pass Differentiable Approximation with the identity (Athalye, Carlini & Wagner 2018).

    Returns ``forward_fn(x)`` exactly on the forward pass and treats it as the identity on the
    backward pass (d out / d x := I). Use it for a step that is not differentiable, or whose
    gradient is useless, but whose output stays close to its input (a reformer, a selection).
    ``forward_fn`` must preserve the shape.
    """
    return BPDA.apply(x, forward_fn)


def input_gradient(loss: Tensor, x: Tensor) -> Tensor:
    """d loss / d x via ``torch.autograd.grad`` (never touches parameters' ``.grad``)."""
    (g,) = torch.autograd.grad(loss, [x])
    return g


class Attack:
    """Base of every attack: L∞ budget ``eps`` on [0, 1] pixels against a logit-returning model.

    ``attack(x, y)`` validates the batch (float NCHW in [0, 1], integer labels), switches the
    model and all its submodules to eval mode, calls :meth:`perturb`, projects the result onto
    the ε-ball around x and onto [0, 1], and restores every module's original mode, even when
    ``perturb`` raises. Subclasses implement only :meth:`perturb`.

    ``attack(x, y, start=x_prev)``, for attacks with ``supports_start``: adversarial examples
    already found for the same inputs, typically at a smaller ε whose ball lies inside this one.
    :meth:`perturb` reads them as ``self._start`` (projected into this ε-ball) and adds a run from
    them; :class:`~training.attacks.AdaptiveAttack` scores every iterate, so with it a larger
    budget never ends weaker than the smaller one.
    """

    supports_start = False

    def __init__(self, model: nn.Module, eps: float) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module returning logits, got {type(model).__name__}")
        self.model = model
        self.eps = check_eps(eps)
        self._start: Tensor | None = None

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """Return the adversarial batch for clean ``x`` (detached) and labels ``y``."""
        raise NotImplementedError

    def __call__(self, x: Tensor, y: Tensor, *, start: Tensor | None = None) -> Tensor:
        x, y = self._check_batch(x, y)
        if start is not None:
            if not self.supports_start:
                raise ValueError(f"{type(self).__name__} does not take a start")
            if not isinstance(start, Tensor) or start.shape != x.shape:
                got = tuple(start.shape) if isinstance(start, Tensor) else type(start).__name__
                raise ValueError(f"start must be a tensor shaped like x {tuple(x.shape)}, got {got}")
            start = project(start.detach().to(x), x, self.eps)
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self._start = start
        try:
            with torch.enable_grad():
                x_adv = self.perturb(x, y)
            return project(x_adv.detach(), x, self.eps)
        finally:
            self._start = None
            for m, training in modes:
                m.training = training

    def _check_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a float NCHW tensor of [0, 1] pixels, got {got}")
        if x.numel() and (bool(x.min() < 0) or bool(x.max() > 1)):
            raise ValueError(
                f"x must hold pixels in [0, 1], got values in [{float(x.min()):.3g}, {float(x.max()):.3g}]: "
                "divide uint8 images by 255 and keep normalisation inside the model"
            )
        if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
            got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"y must be a 1-D integer tensor with one label per image ({x.shape[0]}), got {got}")
        return x.detach(), y.to(device=x.device, dtype=torch.long)

    def _options(self) -> dict[str, Any]:
        return {"eps": self.eps}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({opts})"
