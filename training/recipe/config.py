"""Configuration of the training recipe (docs/training.md): one frozen dataclass, saved in the bundle."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ism_edge.manifest import DEFAULT_DETECTOR_TEMPERATURE, TEMPERATURE_RANGE
from ism_edge_training.bundle import BASELINES

STAGES = ("undefended", "adversarial", "distill", "mapper", "finetune", "perturbation", "calibrate")
STAGE_HELP = {
    "undefended": "plain classifier (no defense): the source model of the oblivious threat model",
    "adversarial": "teacher trained on adversarial examples (random-start FGSM at 8/255 by default), best epoch kept",
    "distill": "deployed student trained on adversarial examples crafted against itself, "
               "with the teacher's soft labels at T",
    "mapper": "mapping network M on (attacked, clean) and (clean, clean) pairs + sparsity + D",
    "finetune": "deployed C fine-tuned on M's outputs (clean and attacked) beside fresh adversarial examples",
    "perturbation": "perturbation classifier P on residuals x - M(x), clean vs attacked",
    "calibrate": "detector thresholds at the target false-positive rate on held-out clean data",
}

BASELINE_HELP = {
    "none": "no defense: the undefended classifier deployed alone",
    "magnet": "MagNet (Meng & Chen 2017): the undefended classifier, a plain autoencoder reformer "
              "(M without k-sparsity, discriminator, guided or adversarial-pair terms) trained on noisy clean "
              "images, reconstruction and JSD detectors",
    "adv-only": "adversarial training alone: C trained on adversarial examples at T = 1; no reformer, no detectors",
    "distill-only": "defensive distillation alone (Papernot et al. 2016): teacher and student at T, no adversarial "
                    "examples; no reformer, no detectors",
    "full": "the full defense: adversarial training, distillation, the instance sparsity mapping network, P, "
            "three detectors",
}
BASELINE_STAGES = {
    "none": ("undefended",),
    "magnet": ("undefended", "mapper", "calibrate"),
    "adv-only": ("undefended", "adversarial", "distill"),
    "distill-only": ("undefended", "adversarial", "distill"),
    "full": STAGES,
}
# MagNet's denoising-autoencoder input noise for CIFAR-10 (Gaussian std on [0, 1] pixels).
MAGNET_NOISE = 0.025
ADV_ATTACKS = ("fgsm-rs", "fgsm", "pgd", "mixed")
DISTILL_METHODS = ("ard", "defensive")
LR_SCHEDULES = ("onecycle", "cosine")
LABEL_SOURCES = ("auto", "reformed")


@dataclass(frozen=True)
class RecipeConfig:
    """Hyper-parameters of every stage. Pixels are in [0, 1]; every ε is an L∞ budget on that scale.

    Epoch counts are per stage (``epochs_distill``: the distillation stage, default
    ``epochs_classifier``). Adversarial training (stages ``adversarial`` and ``distill``):
    ``adv_ratio`` is the fraction of each batch replaced by adversarial examples crafted against
    the model being trained (0 disables adversarial training); ``adv_eps`` is the (low, high)
    range ε is drawn from per batch; ``adv_attack`` is "fgsm-rs" (FGSM from a random start with
    step 1.25·ε: Wong, Rice & Kolter 2020, "Fast is better than free"), "fgsm", "pgd"
    (``adv_pgd_steps`` steps, Madry et al. 2018) or "mixed" (FGSM or PGD per batch: the paper's
    mix). The classifier stages use AdamW with a one-cycle learning rate peaking at ``clf_lr``
    (``lr_schedule="cosine"``: cosine from ``lr``); after each adversarial epoch the model's PGD
    accuracy (``guard_pgd_steps`` steps at ``adv_eps[1]``) on ``guard_examples`` held-out images
    is measured and the best epoch is kept, which guards against catastrophic overfitting.

    Distillation: ``distill_method="ard"`` (adversarially robust distillation, Goldblum et al.
    2020): the teacher is trained at T = 1, and the student, initialised from the teacher when
    ``distill_init="teacher"``, is trained on adversarial examples crafted against itself with the
    teacher's soft labels at ``temperature``; ``"defensive"`` is Papernot et al.'s defensive
    distillation (teacher and student trained at T). ``distill=False`` deploys the adversarially
    trained teacher directly. ``detector_temperature`` is MagNet's JSD temperature.
    ``epochs_finetune`` epochs (stage ``finetune``, after M) train the deployed C on M(x) and
    M(x′) of the adversarial pool beside fresh adversarial examples (cosine from
    ``finetune_lr``), so that reformed inputs keep their labels, and with ``finetune_clean`` on
    the clean images as well. ``pert_variations`` is the
    fraction of P's training pairs given one camera variation (JPEG re-encoding, sensor noise or
    blur), the same on the clean image and its attacked version, so that P does not learn such
    processing as the mark of an attack.
    ``label_source`` is what the bundle's defense labels with: "auto" (C(x) unless a detector
    fires, then C(M(x)): the paper's conclusion) or "reformed" (always C(M(x))).

    ``baseline`` names what the recipe trains (:data:`BASELINE_HELP`); build a baseline's config
    with :meth:`for_baseline`, which sets the flags it implies (``adv_ratio``, ``distill`` and the
    mapping network's terms). ``map_pairs=False`` trains M on clean images only (with Gaussian
    input noise of std ``map_noise``, MagNet's denoising autoencoder) instead of attacked pairs.
    """

    epochs_classifier: int = 10
    epochs_mapper: int = 10
    epochs_perturbation: int = 4
    epochs_distill: int | None = None
    epochs_finetune: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    clf_lr: float = 2e-3
    finetune_lr: float = 5e-4
    finetune_clean: bool = True
    lr_schedule: str = "onecycle"
    weight_decay: float = 5e-4
    augment: bool = True
    adv_ratio: float = 1.0
    adv_eps: tuple[float, float] = (8 / 255, 8 / 255)
    adv_attack: str = "fgsm-rs"
    adv_pgd_steps: int = 5
    guard_examples: int = 1000
    guard_pgd_steps: int = 10
    temperature: float = 20.0
    distill: bool = True
    distill_method: str = "ard"
    distill_init: str = "teacher"
    detector_temperature: float = DEFAULT_DETECTOR_TEMPERATURE
    label_source: str = "auto"
    # Mapping network loss weights (docs/paper.md).
    map_l1: float = 1e-4  # L1 penalty on the sparse code
    map_adv: float = 1e-3  # generator loss from the discriminator
    map_cls: float = 0.5  # classifier-guided term: KL(C(M(x')) || C(x)) (HGD-style, Liao et al. 2018)
    map_pairs: bool = True  # train M on (attacked, clean) pairs as well as clean ones (paper Eq. 3)
    map_noise: float = 0.0  # std of Gaussian noise on M's clean inputs (MagNet: 0.025 on CIFAR-10)
    # Adversarial pool of stages 3-4 (M and P): attack types and ε levels, crafted once against C.
    pert_attacks: tuple[str, ...] = ("fgsm", "pgd")
    # Weighted towards small budgets: large ones are caught by the reconstruction error already.
    pert_eps: tuple[float, ...] = (2 / 255, 4 / 255, 6 / 255, 8 / 255, 10 / 255, 0.1, 0.2, 0.3)
    # Camera variations applied alike to clean and attacked inputs of P (fraction of rows).
    pert_variations: float = 0.5
    # Exact-pixel and re-encoded images weigh alike in P's loss (see stages.perturbation_epoch).
    pert_balance_exact: bool = True
    # Calibration.
    target_fpr: float = 0.01
    calib_fraction: float = 0.1
    feedback_rounds: int = 0
    seed: int = 0
    baseline: str = "full"

    def __post_init__(self) -> None:
        for name in ("epochs_classifier", "epochs_mapper", "epochs_perturbation", "epochs_finetune", "guard_examples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.epochs_distill is not None and self.epochs_distill < 0:
            raise ValueError("epochs_distill must be >= 0")
        if self.adv_pgd_steps < 1 or self.guard_pgd_steps < 1:
            raise ValueError("adv_pgd_steps and guard_pgd_steps must be >= 1")
        if not 0.0 <= self.pert_variations <= 1.0:
            raise ValueError(f"pert_variations must be in [0, 1], got {self.pert_variations}")
        if not (self.lr > 0 and self.clf_lr > 0 and self.finetune_lr > 0):
            raise ValueError("learning rates must be > 0")
        for name, allowed in (("lr_schedule", LR_SCHEDULES), ("distill_method", DISTILL_METHODS),
                              ("distill_init", ("teacher", "scratch")), ("label_source", LABEL_SOURCES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2")
        if not 0.0 <= self.adv_ratio <= 1.0:
            raise ValueError(f"adv_ratio must be in [0, 1], got {self.adv_ratio}")
        lo, hi = self.adv_eps
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"adv_eps must be 0 <= low <= high <= 1, got {self.adv_eps}")
        if self.adv_attack not in ADV_ATTACKS:
            raise ValueError(f"adv_attack must be one of {', '.join(ADV_ATTACKS)}, got {self.adv_attack!r}")
        lo_t, hi_t = TEMPERATURE_RANGE  # what a bundle's manifest may hold: refused now, not after training
        for name in ("temperature", "detector_temperature"):
            if not lo_t <= getattr(self, name) <= hi_t:
                raise ValueError(f"{name} must be in [{lo_t:g}, {hi_t:g}], got {getattr(self, name)}")
        if not 0.0 < self.target_fpr < 0.5:
            raise ValueError(f"target_fpr must be in (0, 0.5), got {self.target_fpr}")
        if not 0.0 < self.calib_fraction < 0.5:
            raise ValueError(f"calib_fraction must be in (0, 0.5), got {self.calib_fraction}")
        if any(a not in ("fgsm", "pgd") for a in self.pert_attacks) or not self.pert_attacks:
            raise ValueError("pert_attacks must be a non-empty subset of fgsm, pgd")
        if any(not 0 < e <= 1 for e in self.pert_eps) or not self.pert_eps:
            raise ValueError("pert_eps must be a non-empty list of values in (0, 1]")
        if self.feedback_rounds < 0:
            raise ValueError("feedback_rounds must be >= 0")
        for name in ("map_l1", "map_adv", "map_cls"):
            if not 0.0 <= getattr(self, name) <= 100.0:
                raise ValueError(f"{name} must be in [0, 100], got {getattr(self, name)}")
        if not 0.0 <= self.map_noise <= 1.0:
            raise ValueError(f"map_noise must be in [0, 1], got {self.map_noise}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self != self.for_baseline(self.baseline):
            raise ValueError(f"the options contradict baseline {self.baseline!r} ({BASELINE_HELP[self.baseline]}): "
                             f"build the config with RecipeConfig.for_baseline")

    def for_baseline(self, name: str) -> RecipeConfig:
        """This config with the flags baseline ``name`` implies; other options are kept."""
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}: choose one of {', '.join(BASELINES)}")
        flags: dict[str, Any] = {"baseline": name}
        if name in ("none", "magnet", "distill-only"):
            flags["adv_ratio"] = 0.0
        if name in ("none", "magnet", "adv-only"):
            flags["distill"] = False
        if name == "distill-only":
            flags.update(distill_method="defensive", distill_init="scratch")
        if name == "magnet":
            flags.update(map_pairs=False, map_l1=0.0, map_adv=0.0, map_cls=0.0,
                         map_noise=self.map_noise if self.baseline == "magnet" else MAGNET_NOISE)
        if all(getattr(self, k) == v for k, v in flags.items()):
            return self
        return replace(self, **flags)

    @property
    def distill_epochs(self) -> int:
        return self.epochs_classifier if self.epochs_distill is None else self.epochs_distill

    @property
    def teacher_temperature(self) -> float:
        """The temperature the adversarial stage trains at: T for defensive distillation, else 1."""
        return self.temperature if self.distill and self.distill_method == "defensive" else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecipeConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


def baseline_stages(name: str) -> tuple[str, ...]:
    """The recipe stages that train baseline ``name``, in recipe order."""
    if name not in BASELINE_STAGES:
        raise ValueError(f"unknown baseline {name!r}: choose one of {', '.join(BASELINES)}")
    return BASELINE_STAGES[name]
