"""Independent cross-check of our attacks with the Adversarial Robustness Toolbox (ART).

On the same images and budgets, ART's L∞ PGD (Madry et al. 2018) and the white-box components
of AutoAttack, APGD-CE and APGD-DLR (Croce & Hein 2020), are run on our models next to our own
PGD: the undefended classifier, the deployed classifier C (``logits / T`` when distilled, as our
attacks see it) and, for bundles with a reformer, the defense's label pipeline C(M(x))
end to end (detectors ignored; ours is :class:`~training.attacks.AdaptiveAttack`
without its detector term). Accuracy of the attacked model is reported; if ART is much stronger
than ours on the same model, our attack is broken. ART is optional
(``pip install adversarial-robustness-toolbox``); without it :func:`crosscheck` raises
:class:`~ism_edge.errors.IsmEdgeError` with that hint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from ism_edge.errors import missing_dependency
from ism_edge_training.attacks import PGD, AdaptiveAttack, Attack
from ism_edge_training.bundle import DefenseBundle
from ism_edge_training.data import ImageArrays
from ism_edge_training.data.torch_utils import to_tensor
from ism_edge_training.defense import Defense, attack_surrogate, is_distilled
from ism_edge_training.evaluation.protocol import EvalConfig

ART_PACKAGE = "adversarial-robustness-toolbox"


def art_version() -> str | None:
    """ART's version, or None when it is not installed."""
    try:
        import art
    except ImportError:
        return None
    return str(art.__version__)


class _Scaled(nn.Module):
    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__()
        self.model = model
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return (out.logits if hasattr(out, "logits") else out) * self.scale


def _targets(bundle: DefenseBundle) -> list[tuple[str, nn.Module, str]]:
    """(label, logit model, kind) for every model cross-checked on this bundle."""
    out: list[tuple[str, nn.Module, str]] = []
    if "undefended" in bundle.networks:
        out.append(("undefended C", bundle.networks["undefended"], "classifier"))
    if bundle.defense.baseline not in ("none", "magnet"):
        out.append(("deployed C" + (" (logits/T)" if is_distilled(bundle) else ""), attack_surrogate(bundle),
                    "classifier"))
    defense = Defense(bundle).eval()
    if defense.mapper is not None and bundle.defense.reformer:
        scale = 1.0 / bundle.temperatures["train"] if is_distilled(bundle) else 1.0
        what = "C(M(x)) if flagged, else C(x)" if defense.label_source == "auto" else "C(M(x))"
        out.append((f"defense label {what}", _Scaled(defense, scale), "defense"))
    return out


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / max(len(x), 1)


def crosscheck(bundle: DefenseBundle, data: ImageArrays, cfg: EvalConfig, *, device: torch.device | str = "cpu",
               progress: Progress | None = None, name: str | None = None,
               echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Our PGD next to ART's PGD, APGD-CE and APGD-DLR on the same ``cfg.n`` images (see module docstring).

    Classifier targets get ``cfg.pgd_steps`` iterations, the defense pipeline
    ``cfg.adaptive_steps``; every attack has one random start. ε > 0 only.
    """
    if art_version() is None:
        raise missing_dependency("art", "eval", f"the ART cross-check ({ART_PACKAGE})")
    from art.attacks.evasion import AutoProjectedGradientDescent, ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    device = torch.device(device)
    bundle.to(device).eval()
    if cfg.n is not None and cfg.n < len(data):
        data = data.subset(np.sort(np.random.default_rng(cfg.seed).permutation(len(data))[: cfg.n]))
    x = to_tensor(data.x).to(device)
    y = torch.from_numpy(data.y).long().to(device)
    x_np, y_np = x.cpu().numpy(), y.cpu().numpy()
    n_classes = len(bundle.class_names)
    eps_list = [e for e in cfg.eps if e > 0]
    targets = _targets(bundle)
    task = progress.add_task(f"ART cross-check {name or bundle.defense.baseline}", total=len(targets) * len(eps_list),
                             metrics="") if progress else None
    rows = []
    t0 = time.perf_counter()
    for label, model, kind in targets:
        model.eval()
        est = PyTorchClassifier(model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=n_classes,
                                clip_values=(0.0, 1.0), device_type="gpu" if device.type == "cuda" else "cpu")
        steps = cfg.adaptive_steps if kind == "defense" else cfg.pgd_steps
        for eps in eps_list:
            ours_attack: Attack
            if kind == "defense":
                ours_attack = AdaptiveAttack(model.model, eps, steps=steps, lam=0.0, seed=cfg.seed)  # type: ignore[arg-type]
            else:
                ours_attack = PGD(model, eps, steps=steps, seed=cfg.seed)
            x_ours = torch.cat([ours_attack(x[i:i + cfg.batch_size], y[i:i + cfg.batch_size])
                                for i in range(0, len(x), cfg.batch_size)])
            row: dict[str, Any] = {"target": label, "eps": eps, "n": len(y), "steps": steps,
                                   "ours_pgd": _accuracy(model, x_ours, y, cfg.batch_size)}
            art_attacks: dict[str, Any] = {
                "art_pgd": ProjectedGradientDescentPyTorch(est, norm=np.inf, eps=eps, eps_step=2.5 * eps / steps,
                                                           max_iter=steps, num_random_init=1,
                                                           batch_size=cfg.batch_size, verbose=False),
                "art_apgd_ce": AutoProjectedGradientDescent(est, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=steps,
                                                            nb_random_init=1, batch_size=cfg.batch_size,
                                                            loss_type="cross_entropy", verbose=False),
            }
            if n_classes >= 3:  # DLR needs the third-largest logit
                art_attacks["art_apgd_dlr"] = AutoProjectedGradientDescent(
                    est, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=steps, nb_random_init=1,
                    batch_size=cfg.batch_size, loss_type="difference_logits_ratio", verbose=False)
            for key, atk in art_attacks.items():
                np.random.seed(cfg.seed)
                x_art = torch.from_numpy(atk.generate(x=x_np, y=y_np).astype(np.float32)).to(device)
                assert float((x_art - x).abs().max()) <= eps + 1e-5, f"{key} left the ε-ball"
                row[key] = _accuracy(model, x_art, y, cfg.batch_size)
            rows.append(row)
            if echo is not None:
                echo(f"cross-check {name or bundle.defense.baseline}: {label} ε={eps:.3g}: "
                     + ", ".join(f"{k} {v:.1%}" for k, v in row.items() if k.startswith(("ours", "art"))))
            if progress is not None and task is not None:
                progress.advance(task)
    if progress is not None and task is not None:
        progress.remove_task(task)
    return {"name": name or bundle.defense.baseline, "art_version": art_version(), "n": len(y), "rows": rows,
            "wall_s": round(time.perf_counter() - t0, 1)}


def crosscheck_markdown(checks: list[dict[str, Any]]) -> str:
    """The cross-check as a Markdown table (accuracy of the attacked model, %)."""
    from ism_edge_training.evaluation.report import eps_label

    head = ["defense", "attacked model", "ε", "steps", "ours PGD %", "ART PGD %", "ART APGD-CE %", "ART APGD-DLR %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in checks:
        for r in c["rows"]:
            vals = [r.get(k) for k in ("ours_pgd", "art_pgd", "art_apgd_ce", "art_apgd_dlr")]
            lines.append("| " + " | ".join([c["name"], r["target"], eps_label(r["eps"]), str(r["steps"])]
                                           + ["—" if v is None else f"{100 * v:.1f}" for v in vals]) + " |")
    version = checks[0]["art_version"] if checks else "?"
    n = checks[0]["n"] if checks else 0
    lines += ["", f"ART {version}; {n} images; one random start each; accuracy of the attacked model on its own "
              "adversarial examples (the defense row ignores the detectors on both sides)."]
    return "\n".join(lines) + "\n"
