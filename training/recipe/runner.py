"""The recipe runner: all stages in order (or a chosen subset), checkpoints, resume, the bundle."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ism_edge.errors import BundleError, DataError, IsmEdgeError
from ism_edge_training import distributed as dist
from ism_edge_training.bundle import DefenseBundle, DefenseSpec, bundle_hash
from ism_edge_training.data import ImageArrays, load_dataset
from ism_edge_training.defense import Defense, attack_surrogate
from ism_edge_training.models import ScaledLogits
from ism_edge_training.models import preset as model_preset
from ism_edge_training.models.external import FINETUNE_METHODS, ClassifierSource, ExternalClassifier
from ism_edge_training.progress import log, make_progress
from ism_edge_training.recipe.config import STAGES, RecipeConfig, baseline_stages
from ism_edge_training.recipe.stages import (
    BestEpoch,
    EpochContext,
    adversarial_pool,
    calibrate_thresholds,
    classifier_epoch,
    defense_scores,
    finetune_epoch,
    heldout_accuracy,
    mapper_epoch,
    perturbation_epoch,
)

CHECKPOINT = "checkpoint.pt"


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise IsmEdgeError(f"--device {name}: no CUDA GPU is visible to PyTorch; use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise IsmEdgeError(f"--device {name!r} is not cpu, cuda, cuda:N or auto")
    return torch.device(name)


@dataclass
class TrainRequest:
    """Everything ``ism-edge train`` asks for."""

    data: Sequence[str | os.PathLike[str]]
    out: Path
    preset: str = "small"
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    stages: Sequence[str] = STAGES
    device: str = "auto"
    resume: bool = False
    data_kind: str = "auto"
    attribute: str = "Smiling"
    exact_only: bool = False
    limit: int | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: Path | None = None  # a bundle whose undefended/adversarial stages this one shares
    # how the bundle stores its weights; None keeps the existing bundle's (float32 if new)
    weights_dtype: str | None = None
    # a user's own classifier (ism-edge train --classifier): frozen, M and P are trained around it
    classifier: ClassifierSource | None = None
    # "adversarial": the recipe's adversarial stage runs on a copy of that classifier first, then (with
    # recipe.distill) its distill stage on a second copy (--finetune)
    finetune: str = "none"


#: The stages that train around a user's frozen classifier; the classifier stages are skipped.
FROZEN_CLASSIFIER_STAGES = ("mapper", "perturbation", "calibrate")
#: With ``--finetune adversarial``: the adversarial stage trains a copy of the user's classifier first,
#: and (unless ``--no-distill``) the distill stage distils a second copy from it, which is deployed.
FINETUNED_CLASSIFIER_STAGES = ("adversarial", "distill", *FROZEN_CLASSIFIER_STAGES)


def defensive_with_finetune(temperature: float) -> str:
    """Why ``--finetune`` refuses ``--distill-method defensive`` (the CLI's usage error and the runner's)."""
    return (f"--distill-method defensive trains the classifier's logits at T = {temperature:g}, which would change "
            "the scale of your classifier's logits: with --finetune use --distill-method ard (the default) or "
            "--no-distill")


class Checkpointer:
    """The latest per-epoch training state in ``<bundle>.ckpt/checkpoint.pt`` (tensors + plain data)."""

    def __init__(self, bundle_dir: Path) -> None:
        self.dir = bundle_dir.with_name(bundle_dir.name + ".ckpt")
        self.path = self.dir / CHECKPOINT

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (rank 0 only; the other ranks wait until it is written)."""
        if not dist.is_main():
            dist.barrier()
            return
        self._write(state)
        dist.barrier()

    def _write(self, state: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt checkpoint
            raise IsmEdgeError(f"checkpoint {self.path} cannot be read ({type(e).__name__}): "
                               "delete it and train without --resume") from None


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def _optimizer(params: Any, cfg: RecipeConfig, lr: float | None = None) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr if lr is None else lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def clean_accuracy(model: torch.nn.Module, data: ImageArrays, device: torch.device) -> float:
    from ism_edge_training.data.torch_utils import iterate_batches

    model.eval()
    correct = 0
    n = max(len(data), 1)
    if dist.active():  # each rank counts its part of the held-out images
        data = data.subset(dist.local_part(len(data)))
    for x, y in iterate_batches(data, 256, shuffle=False, device=device):
        correct += int((model(x).argmax(1) == y).sum())
    return dist.sum_all(correct)[0] / n


class RecipeRunner:
    """Runs the recipe's stages (docs/training.md) on one dataset and writes the defense bundle after each stage."""

    def __init__(self, req: TrainRequest, *, echo: Callable[[str], None] = log) -> None:
        self.req = req
        self.cfg = req.recipe
        self.echo = echo if dist.is_main() else _quiet  # one log: rank 0's
        self.device = resolve_device(req.device)
        if dist.active() and (self.cfg.batch_size % dist.world_size() or dist.local_batch(self.cfg.batch_size) < 2):
            raise IsmEdgeError(f"--batch-size {self.cfg.batch_size} is the global batch: it must be a multiple of the "
                               f"{dist.world_size()} ranks, at least 2 per rank")
        unknown = [s for s in req.stages if s not in STAGES]
        if unknown:
            raise IsmEdgeError(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGES)}")
        allowed = baseline_stages(self.cfg.baseline)
        if set(req.stages) != set(STAGES):
            extra = [s for s in req.stages if s not in allowed]
            if extra:
                raise IsmEdgeError(f"stage(s) {', '.join(extra)} are not part of baseline {self.cfg.baseline!r} "
                                   f"(its stages: {', '.join(allowed)})")
        self.stages = [s for s in STAGES if s in req.stages and s in allowed]
        if req.finetune not in FINETUNE_METHODS:
            raise IsmEdgeError(f"--finetune {req.finetune!r}: choose from {', '.join(FINETUNE_METHODS)}")
        self.finetune = req.classifier is not None and req.finetune != "none"
        if req.finetune != "none" and req.classifier is None:
            raise IsmEdgeError(f"--finetune {req.finetune} fine-tunes a user's classifier: pass --classifier")
        if req.classifier is not None:
            if self.cfg.baseline != "full":
                raise IsmEdgeError(f"--classifier protects a user's classifier with the full defense; --baseline "
                                   f"{self.cfg.baseline} trains a classifier of its own")
            own = FINETUNED_CLASSIFIER_STAGES if self.finetune else FROZEN_CLASSIFIER_STAGES
            frozen = [s for s in self.stages if s not in own]
            if set(req.stages) != set(STAGES) and frozen:
                keeps = "fine-tunes only in the adversarial and distill stages" if self.finetune else "keeps frozen"
                raise IsmEdgeError(f"stage(s) {', '.join(frozen)} train the classifier, which --classifier {keeps}: "
                                   f"choose from {', '.join(own)}")
            self.stages = [s for s in self.stages if s in own]
        if self.finetune:
            if self.cfg.adv_ratio <= 0 or self.cfg.adv_eps[1] <= 0:
                raise IsmEdgeError("--finetune adversarial trains on adversarial examples: --adv-ratio and the "
                                   "upper --adv-eps must be > 0")
            if req.init_from is not None:
                raise IsmEdgeError("--init-from shares the recipe's own classifier stages; with --finetune the "
                                   "adversarial stage trains a copy of --classifier: drop --init-from")
            if self.cfg.distill and self.cfg.distill_method == "defensive":
                # Defensive distillation trains teacher and student at T: the deployed logits would be
                # on another scale than the user's (b.temperatures["train"] is 1 for a user's classifier).
                raise IsmEdgeError(defensive_with_finetune(self.cfg.temperature))
            after = [s for s in self.stages if STAGES.index(s) > STAGES.index("distill")]
            if self.cfg.distill and "adversarial" in self.stages and "distill" not in self.stages and after:
                raise IsmEdgeError(f"stage(s) {', '.join(after)} train around the distilled student of the "
                                   "fine-tuned copy, which the distill stage makes: add distill to --stages, or "
                                   "pass --no-distill to deploy the fine-tuned copy itself")
        self.spec = DefenseSpec.for_baseline(self.cfg.baseline)
        self.ckpt = Checkpointer(Path(req.out))

    # -- set-up --------------------------------------------------------------------------
    def _load_data(self, image_size: int | tuple[int, int]) -> tuple[ImageArrays, ImageArrays]:
        arrays = load_dataset(self.req.data, kind=self.req.data_kind, split="train", image_size=image_size,
                              attribute=self.req.attribute, exact_only=self.req.exact_only,
                              limit=self.req.limit, seed=self.cfg.seed)
        train, calib = arrays.split(self.cfg.calib_fraction, seed=self.cfg.seed)
        self.echo(f"data: {len(arrays)} images ({arrays.provenance.get('kind')}), {len(arrays.class_names)} classes; "
                  f"{len(train)} for training, {len(calib)} held out for calibration")
        return train, calib

    def _external_bundle(self, train: ImageArrays, calib: ImageArrays) -> DefenseBundle:
        """The bundle around the user's classifier: read, checked and converted here (or loaded from
        ``--out`` when the run starts after the mapper stage), with fresh M, P and D."""
        from ism_edge_training.bundle import external_networks
        from ism_edge_training.models.external import prepare_classifier
        from ism_edge_training.models.padded import mapper_side

        assert self.req.classifier is not None
        out = Path(self.req.out)
        samples = np.concatenate([calib.x[:32], train.x[:32]]).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        self._samples = samples  # what the fine-tuned copy's ONNX export is checked on
        clf = prepare_classifier(self.req.classifier, samples)
        self._user_classifier = clf.to(self.device)
        k = clf.num_classes
        if len(train.class_names) != k:
            raise DataError(f"the data has {len(train.class_names)} classes ({', '.join(train.class_names[:5])}"
                            f"{', …' if len(train.class_names) > 5 else ''}) but {self.req.classifier.path} outputs "
                            f"{k}: pass data with one folder per output, or --classes FILE naming them in output order")
        first = "adversarial" if self.finetune else "mapper"
        if STAGES.index(self.stages[0]) > STAGES.index(first):
            if not (out / "manifest.json").is_file():
                raise BundleError(f"stage {self.stages[0]!r} needs the bundle of the {first} stage at {out}: "
                                  "run that stage first (or all stages at once)")
            own = self._own_bundle(out, clf.record, train)
            h, w = clf.contract.size
            for n, net in external_networks(own.config, clf, (h, w)).items():
                if n not in own.networks:  # not trained by the earlier run (its discriminator)
                    own.networks[n] = net
                    self._absent.add(n)
            self._absent.update(own.untrained)
            return own.to(self.device)
        h, w = clf.contract.size
        cfg = model_preset(self.req.preset, num_classes=k, channels=3, image_size=mapper_side(h, w),
                           **self.req.model_overrides)
        networks = external_networks(cfg, clf, (h, w))
        if self.finetune:  # the adversarial stage trains a copy; the user's classifier is left as it is
            networks["classifier"] = clf.trainable_copy()
        b = DefenseBundle(config=cfg, networks=networks, class_names=train.class_names,
                          preset=self.req.preset, classifier_record=clf.record)
        self._absent.update(n for n in networks if n != "classifier")  # the user's classifier is trained
        self.echo(f"classifier: {self.req.classifier.path} ({k} classes, input {h}x{w} "
                  f"{clf.contract.layout} {clf.contract.channel_order}, scale {clf.contract.scale:g}), "
                  f"{self._finetune_plan() if self.finetune else 'frozen'}; "
                  f"onnx2torch's conversion agrees with ONNX Runtime to "
                  f"{clf.record['conversion_check']['max_rel_diff']:.1g}")
        return b.to(self.device)

    def _own_bundle(self, out: Path, record: dict[str, Any], train: ImageArrays) -> DefenseBundle:
        """The bundle at ``out`` of an earlier run around the same user's classifier (``record``):
        the frozen classifier, or its fine-tuned copy when this run fine-tunes, as the earlier run did."""
        assert self.req.classifier is not None
        b = DefenseBundle.load(out)
        if b.classifier_record.get("origin", {}).get("sha256") != record["origin"]["sha256"]:
            raise BundleError(f"{out} was trained around another classifier than {self.req.classifier.path}: "
                              "write to another --out")
        if tuple(b.class_names) != tuple(train.class_names):
            raise BundleError(f"{out} was trained on classes {list(b.class_names)[:4]}…, the data has "
                              f"{list(train.class_names)[:4]}…: use the same dataset")
        tuned = "finetuned" in b.classifier_record
        if self.finetune and not tuned:
            raise BundleError(f"{out} holds {self.req.classifier.path} as it is, not a fine-tuned copy: run the "
                              "adversarial stage too, or drop --finetune")
        if tuned and not self.finetune:
            raise BundleError(f"{out} holds a fine-tuned copy of {self.req.classifier.path}: pass --finetune "
                              f"{b.classifier_record['finetuned']['method']}, or write to another --out")
        return b

    def _initial_bundle(self, train: ImageArrays) -> DefenseBundle:
        out = Path(self.req.out)
        first = self.stages[0]
        # The undefended classifier alone (the oblivious attacker's source model) is added to the
        # bundle already at --out: a fresh bundle would drop that bundle's trained networks.
        adds_undefended = self.stages == ["undefended"] and (out / "manifest.json").is_file()
        needs_existing = STAGES.index(first) > 0 or adds_undefended
        if needs_existing and (out / "manifest.json").is_file():
            b = DefenseBundle.load(out)
            if b.defense.baseline != self.cfg.baseline:
                raise BundleError(f"{out} was trained as baseline {b.defense.baseline!r}, not {self.cfg.baseline!r}: "
                                  f"rerun with --baseline {b.defense.baseline} or write to another --out")
            if adds_undefended and b.defense.baseline == "magnet":
                raise BundleError(f"{out} deploys its undefended classifier with MagNet's detectors calibrated around "
                                  "it: train all its stages again, to another --out")
            if tuple(b.class_names) != tuple(train.class_names):
                raise BundleError(f"{out} was trained on classes {list(b.class_names)[:4]}…, the data has "
                                  f"{list(train.class_names)[:4]}…: use the same dataset")
            # Networks the bundle does not hold (a shipped bundle keeps only the deployed ones) get
            # untrained stand-ins; they are saved only once a stage of this run has trained them.
            for n, net in DefenseBundle.create(b.config, b.class_names).networks.items():
                if n not in b.networks:
                    b.networks[n] = net
                    self._absent.add(n)
            self._absent.update(b.untrained)  # stand-ins an earlier run of fewer stages saved
            return b.to(self.device)
        if needs_existing and first not in ("undefended", "adversarial"):
            prior = [s for s in STAGES[: STAGES.index(first)] if s not in ("undefended",)]
            raise BundleError(f"stage {first!r} needs a bundle with the earlier stages ({', '.join(prior)}) "
                              f"at {out}: run those stages first (or all stages at once)")
        overrides = dict(self.req.model_overrides)
        if self.cfg.baseline == "magnet":  # a plain autoencoder: no k-sparse step
            overrides["sparsity_k"] = model_preset(self.req.preset).latent_dim
        cfg = model_preset(self.req.preset, num_classes=len(train.class_names), channels=int(train.x.shape[-1]),
                           **overrides)
        if self.req.preset not in ("celeba64", "celeba128") and train.x.shape[1] != cfg.image_size:
            cfg = replace(cfg, image_size=int(train.x.shape[1]))
        b = DefenseBundle.create(cfg, train.class_names, preset=self.req.preset)
        self._absent.update(b.networks)  # random until a stage of this run trains them
        return b.to(self.device)

    # -- stages --------------------------------------------------------------------------
    def _guard_set(self, calib: ImageArrays) -> ImageArrays:
        """The held-out images the guard measures PGD accuracy on (the first ``guard_examples``)."""
        n = self.cfg.guard_examples
        return calib.subset(np.arange(min(n, len(calib)))) if n else calib

    def _guard(self, model: torch.nn.Module, data: ImageArrays, eps: float) -> dict[str, Any]:
        """A stage's guard record: clean and PGD accuracy of ``model`` on ``data`` at ``eps``."""
        clean, robust = heldout_accuracy(model, data, self.device, eps=eps, steps=self.cfg.guard_pgd_steps)
        return {"n": len(data), "eps": eps, "pgd_steps": self.cfg.guard_pgd_steps, "clean_acc": clean,
                "pgd_acc": robust}

    def _classifier_stage(self, stage: str, b: DefenseBundle, train: ImageArrays, calib: ImageArrays,
                          state: dict[str, Any], *, net: torch.nn.Module | None = None,
                          teacher: torch.nn.Module | None = None) -> dict[str, Any]:
        """One classifier stage; ``net`` (and for ``distill`` its ``teacher``) replace the bundle's
        networks of the stage: the copies of a user's classifier that ``--finetune`` trains, whose
        student is already initialised as ``distill_init`` asks."""
        cfg = self.cfg
        teacher_scale = 1.0
        epochs = cfg.epochs_classifier
        if stage == "undefended":
            net, teacher, temp, adv = b.networks["undefended"], None, 1.0, False
        elif stage == "adversarial":
            if net is None:
                net = b.networks["teacher"] if cfg.distill else b.classifier
            teacher, temp, adv = None, cfg.teacher_temperature, cfg.adv_ratio > 0
        else:  # distill
            given = net is not None
            net = b.classifier if net is None else net
            teacher = b.networks["teacher"] if teacher is None else teacher
            temp, adv = cfg.temperature, cfg.adv_ratio > 0
            teacher.eval()
            teacher_scale = cfg.teacher_temperature
            epochs = cfg.distill_epochs
            if cfg.distill_init == "teacher" and not state and not given:
                net.load_state_dict(teacher.state_dict())
        opt = _optimizer(net.parameters(), cfg, lr=cfg.clf_lr if cfg.lr_schedule == "onecycle" else cfg.lr)
        per_batch: torch.optim.lr_scheduler.LRScheduler | None = None
        if cfg.lr_schedule == "onecycle":
            steps = max(epochs, 1) * max(dist.batches_per_epoch(len(train), cfg.batch_size), 1)
            per_batch = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.clf_lr, total_steps=steps, pct_start=0.3)
            sched: Any = per_batch
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
        # The model the attacks differentiate: logits / T for a network whose logits were trained at T
        # (their softmax saturates: gradient masking otherwise). A student's logits take its teacher's scale.
        logit_temp = cfg.teacher_temperature if stage == "distill" else temp
        surrogate = ScaledLogits(net, 1.0 / logit_temp) if logit_temp != 1.0 else net
        guard_eps = cfg.adv_eps[1] if adv else 0.0
        guard_data = self._guard_set(calib)
        best = BestEpoch(net)

        def measure(epoch: int) -> dict[str, float]:
            if not adv or not cfg.guard_examples:
                return {}
            clean, robust = heldout_accuracy(surrogate, guard_data, self.device, eps=guard_eps,
                                             steps=cfg.guard_pgd_steps)
            kept = best.update(epoch, robust)
            return {"heldout_clean_acc": clean, "heldout_pgd_acc": robust, "kept": float(kept)}

        def after() -> dict[str, Any]:
            out: dict[str, Any] = {}
            if best.weights is not None:
                best.restore()
                out["best_epoch"] = best.epoch + 1
            out["clean_acc_heldout"] = clean_accuracy(net, calib, self.device)
            if adv and cfg.guard_examples:
                out["guard"] = self._guard(surrogate, guard_data, guard_eps)
            return out

        trained = dist.data_parallel(net, self.device)  # gradients averaged over the ranks; attacks use net
        return self._epochs(stage, epochs, [opt, sched, best], state, b, train,
                            lambda ctx: classifier_epoch(trained, opt, ctx, temperature=temp, adversarial=adv,
                                                         teacher=teacher, teacher_scale=teacher_scale,
                                                         scheduler=per_batch, attack_target=surrogate),
                            after=after, measure=measure)

    def _finetune_classifier(self, b: DefenseBundle, train: ImageArrays, calib: ImageArrays,
                             state: dict[str, Any]) -> dict[str, Any]:
        """``--finetune adversarial``: the recipe's adversarial stage on the trainable copy of the
        user's classifier, which is then exported to ONNX at the user's input contract, checked
        and frozen again as the bundle's classifier (the distill stage's teacher, or with
        ``--no-distill`` the classifier that M, P and the thresholds train around)."""
        from ism_edge_training.models.external import finetuned_classifier

        cfg = self.cfg
        guard_data = self._guard_set(calib)
        eps = cfg.adv_eps[1]
        before = self._guard(self._user_classifier, guard_data, eps)
        metrics = self._classifier_stage("adversarial", b, train, calib, state, net=b.classifier)
        trained = b.classifier
        after = metrics.get("guard") or self._guard(trained, guard_data, eps)
        entry = {"method": "adversarial", "epochs": int(metrics["epochs"]), "attack": cfg.adv_attack,
                 "eps": list(cfg.adv_eps), "adv_ratio": cfg.adv_ratio, "best_epoch": metrics.get("best_epoch"),
                 "heldout": _heldout(before, after, eps, ("before", "after"))}
        clf = finetuned_classifier(trained.cpu(), self._samples, entry)  # type: ignore[arg-type]
        self._deploy_external(b, clf)
        self.echo(f"classifier fine-tuned: held-out clean {before['clean_acc']:.1%} → {after['clean_acc']:.1%}, "
                  f"PGD-{before['pgd_steps']} at ε={eps:.4g} {before['pgd_acc']:.1%} → {after['pgd_acc']:.1%} "
                  f"({before['n']} images); its ONNX export matches to "
                  f"{clf.record['finetuned']['export_check']['max_rel_diff']:.1g}")
        return {**metrics, "finetuned": clf.record["finetuned"]}

    def _deploy_external(self, b: DefenseBundle, clf: ExternalClassifier) -> None:
        """``clf`` (an exported and checked copy of the user's classifier) becomes the bundle's classifier."""
        b.networks["classifier"] = clf.to(self.device)
        b.classifier_record = clf.record
        b.provenance["classifier"] = clf.record["origin"]

    def _finetune_plan(self) -> str:
        """What ``--finetune`` does to the user's classifier, for the log."""
        if self.cfg.distill:
            return (f"fine-tuned adversarially on a copy, then distilled ({self.cfg.distill_method}, T = "
                    f"{self.cfg.temperature:g}) into a second copy that is deployed")
        return "fine-tuned adversarially on a copy (no distillation)"

    def _check_distilled(self, b: DefenseBundle) -> None:
        """With ``--finetune``, refuse a run whose remaining stages start after the adversarial stage
        and do not fit the bundle's classifier: a second distillation of an already distilled
        student, or M and P trained around a classifier that is (or is not) distilled when the
        recipe says the opposite. One line each, before anything is trained or written."""
        pending = [s for s in self.stages if s not in self._completed]
        if not pending or "adversarial" in pending:
            return  # the adversarial stage makes a new fine-tuned copy
        assert self.req.classifier is not None
        out, src = self.req.out, self.req.classifier.path
        distilled = "distill" in b.classifier_record.get("finetuned", {})
        if self.cfg.distill and "distill" in pending:
            if distilled:
                raise BundleError(f"{out} already holds the distilled student of the fine-tuned copy of {src}: a "
                                  "second distillation would start from that student, not from the fine-tuned "
                                  "teacher: run the adversarial stage too (--stages adversarial,distill,…), or "
                                  "write to another --out")
        elif self.cfg.distill and not distilled:
            raise BundleError(f"{out} holds the fine-tuned copy of {src}, not yet distilled: run the distill stage "
                              "too (--stages distill,…), or pass --no-distill to deploy the fine-tuned copy itself")
        elif not self.cfg.distill and distilled:
            raise BundleError(f"{out} holds the distilled student of the fine-tuned copy of {src}: drop "
                              "--no-distill, or write to another --out")

    def _distill_finetuned(self, b: DefenseBundle, train: ImageArrays, calib: ImageArrays,
                           state: dict[str, Any]) -> dict[str, Any]:
        """``--finetune adversarial`` with distillation: the recipe's distill stage (ARD by default) with
        the fine-tuned copy as the teacher and a second trainable copy as the student — of the
        teacher when ``distill_init`` is "teacher", else of the user's classifier as given.

        The teacher is the bundle's classifier as exported by the adversarial stage (of this run,
        or of an earlier one, read from ``--out``). The student is exported to ONNX at the user's
        input contract, checked as the fine-tuned copy was, and replaces the teacher as the bundle's
        frozen classifier. The teacher is not saved (a user's architecture is kept only as a
        graph): the record's ``finetuned`` entry keeps its held-out figures and gains ``distill``.
        """
        from ism_edge_training.models.external import ExternalClassifier, finetuned_classifier

        cfg = self.cfg
        teacher = b.networks["classifier"]
        if not isinstance(teacher, ExternalClassifier) or "finetuned" not in b.classifier_record:
            raise BundleError(f"{self.req.out} holds no fine-tuned copy to distil: run the adversarial stage too")
        tuned = b.classifier_record["finetuned"]
        source = teacher if cfg.distill_init == "teacher" else self._user_classifier
        student = source.trainable_copy().to(self.device)
        if state.get("stage") == "distill" and "nets" in state:  # resumed: the student of the last epoch
            student.load_state_dict(state["nets"]["classifier"])
        guard_data = self._guard_set(calib)
        eps = cfg.adv_eps[1]
        before = self._guard(teacher, guard_data, eps)
        b.networks["classifier"] = student  # trained and checkpointed as the bundle's classifier
        try:
            metrics = self._classifier_stage("distill", b, train, calib, state, net=student, teacher=teacher)
        except BaseException:
            b.networks["classifier"] = teacher
            raise
        after = metrics.get("guard") or self._guard(student, guard_data, eps)
        entry: dict[str, Any] = {
            "method": cfg.distill_method, "epochs": int(metrics["epochs"]), "temperature": cfg.temperature,
            "init": cfg.distill_init, "best_epoch": metrics.get("best_epoch"),
            "heldout": _heldout(before, after, eps, ("teacher", "student"))}
        clf = finetuned_classifier(student.cpu(), self._samples, {}, what="distilled student")
        entry["export_check"] = clf.record["finetuned"]["export_check"]
        clf.record["finetuned"] = {**tuned, "distill": entry}  # the teacher's facts, then the student's
        self._deploy_external(b, clf)
        self.echo(f"classifier distilled ({cfg.distill_method}, T = {cfg.temperature:g}): held-out clean "
                  f"{before['clean_acc']:.1%} (teacher) → {after['clean_acc']:.1%} (student), "
                  f"PGD-{before['pgd_steps']} at ε={eps:.4g} {before['pgd_acc']:.1%} → {after['pgd_acc']:.1%} "
                  f"({before['n']} images); its ONNX export matches to {entry['export_check']['max_rel_diff']:.1g}")
        return {**metrics, "distill": entry}

    def _pool(self, b: DefenseBundle, train: ImageArrays) -> torch.Tensor:
        """The adversarial pool; with several ranks each crafts and keeps the pool of its own shard."""
        if self._adv_pool is None:
            t0 = time.perf_counter()
            data = train
            if dist.active():
                self._pool_index = dist.shard(np.arange(len(train)))
                data = train.subset(self._pool_index)
            with _progress() as progress:
                self._adv_pool = adversarial_pool(attack_surrogate(b), data, self.cfg, self.device, progress)
            ranks = f" ({len(data)} on each of {dist.world_size()} ranks)" if dist.active() else ""
            self.echo(f"adversarial pool: {len(train)} examples crafted against the deployed classifier{ranks} "
                      f"in {time.perf_counter() - t0:.0f} s")
        return self._adv_pool

    def _mapper_stage(self, b: DefenseBundle, train: ImageArrays, calib: ImageArrays,
                      state: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        opt_m = _optimizer(b.mapper.parameters(), cfg)
        opt_d = torch.optim.Adam(b.networks["discriminator"].parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_m, T_max=max(cfg.epochs_mapper, 1))

        def after() -> dict[str, Any]:
            d = Defense(b)
            s = defense_scores(d, calib, self.device)
            y = calib.y
            return {"heldout_recon_error_mean": float(s["recon_error"].mean()),
                    "heldout_acc_reformed": float((s["label_reformed"] == y).mean()),
                    "heldout_acc_raw": float((s["label_raw"] == y).mean())}

        pool = self._pool(b, train) if cfg.epochs_mapper > 0 and cfg.map_pairs else None
        mapper, disc = dist.data_parallel(b.mapper, self.device), dist.data_parallel(b.networks["discriminator"],
                                                                                     self.device)
        return self._epochs("mapper", cfg.epochs_mapper, [opt_m, opt_d, sched], state, b, train,
                            lambda ctx: mapper_epoch(mapper, disc, attack_surrogate(b),
                                                     opt_m, opt_d, ctx),
                            after=after, pool=pool)

    def _finetune_stage(self, b: DefenseBundle, train: ImageArrays, calib: ImageArrays,
                        state: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        net, temp = b.classifier, cfg.teacher_temperature  # the deployed C's logits are on its teacher's scale
        surrogate = ScaledLogits(net, 1.0 / temp) if temp != 1.0 else net
        opt = _optimizer(net.parameters(), cfg, lr=cfg.finetune_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs_finetune, 1))
        guard_data = self._guard_set(calib)

        def after() -> dict[str, Any]:
            s = defense_scores(Defense(b, feedback_rounds=0), calib, self.device)
            out: dict[str, Any] = {"heldout_acc_raw": float((s["label_raw"] == calib.y).mean()),
                                   "heldout_acc_reformed": float((s["label_reformed"] == calib.y).mean())}
            if cfg.guard_examples and cfg.adv_eps[1] > 0:
                out["guard"] = self._guard(surrogate, guard_data, cfg.adv_eps[1])
            return out

        pool = self._pool(b, train) if cfg.epochs_finetune > 0 else None
        trained = dist.data_parallel(net, self.device)
        result = self._epochs("finetune", cfg.epochs_finetune, [opt, sched], state, b, train,
                              lambda ctx: finetune_epoch(trained, b.mapper, opt, ctx, attack_target=surrogate,
                                                         temperature=temp),
                              after=after, pool=pool)
        self._adv_pool = None  # crafted against C before it changed: P gets a new one
        return result

    def _perturbation_stage(self, b: DefenseBundle, train: ImageArrays, calib: ImageArrays,
                            state: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        opt = _optimizer(b.perturbation.parameters(), cfg)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs_perturbation, 1))
        pool = self._pool(b, train) if cfg.epochs_perturbation > 0 else None
        trained = dist.data_parallel(b.perturbation, self.device)
        return self._epochs("perturbation", cfg.epochs_perturbation, [opt, sched], state, b, train,
                            lambda ctx: perturbation_epoch(trained, b.mapper, b.classifier, opt, ctx), pool=pool)

    def _calibrate(self, b: DefenseBundle, calib: ImageArrays) -> dict[str, Any]:
        b.thresholds = {}
        b.feedback_rounds = self.cfg.feedback_rounds
        b.temperatures["detector"] = self.cfg.detector_temperature
        scores = defense_scores(Defense(b, feedback_rounds=0), calib, self.device)
        # Exact-pixel and re-encoded (JPEG-decoded) images score differently: each threshold must
        # hold its false-positive rate on both kinds, so it is the larger of their quantiles.
        groups: dict[str, np.ndarray] = {}
        if calib.exact is not None and 0 < int(calib.exact.sum()) < len(calib):
            groups = {"exact_pixels": calib.exact, "re_encoded": ~calib.exact}
        b.thresholds = calibrate_thresholds(scores, self.cfg.target_fpr, b.defense.detectors,
                                            groups=list(groups.values()) or None)
        b.target_fpr = self.cfg.target_fpr
        fpr = {k: float((scores[k] > v).mean()) for k, v in b.thresholds.items()}
        any_flag = np.zeros(len(calib), dtype=bool)
        for k, v in b.thresholds.items():
            any_flag |= scores[k] > v
        b.calibration = {"n": len(calib), "split": "held out from the training data", "target_fpr": self.cfg.target_fpr,
                         "fpr_per_detector": fpr, "fpr_any": float(any_flag.mean()),
                         "groups": {name: {"n": int(m.sum()), "fpr_any": float(any_flag[m].mean())}
                                    for name, m in groups.items()},
                         "score_quantiles": {k: [float(q) for q in np.quantile(scores[k], [0.5, 0.9, 0.99])]
                                             for k in b.thresholds}}
        self.echo("calibrated thresholds: " + ", ".join(f"{k} {v:.4g}" for k, v in b.thresholds.items())
                  + f" (target FPR {self.cfg.target_fpr:.2%} each; "
                    f"any-detector FPR {any_flag.mean():.2%} on {len(calib)} held-out)")
        return dict(b.calibration)

    def _epochs(self, stage: str, epochs: int, stateful: list[Any], state: dict[str, Any], b: DefenseBundle,
                train: ImageArrays, run_epoch: Callable[[EpochContext], dict[str, float]],
                after: Callable[[], dict[str, Any]] | None = None, pool: torch.Tensor | None = None,
                measure: Callable[[int], dict[str, float]] | None = None) -> dict[str, Any]:
        start_epoch = 0
        if state.get("stage") == stage and "opt" in state:
            for obj, sd in zip(stateful, state["opt"], strict=True):
                obj.load_state_dict(sd)
            start_epoch = int(state["epoch"]) + 1
            self.echo(f"{stage}: resuming at epoch {start_epoch + 1}/{epochs}")
        history: list[dict[str, float]] = list(state.get("history", [])) if state.get("stage") == stage else []
        with _progress() as progress:
            for epoch in range(start_epoch, epochs):
                ctx = EpochContext(self.cfg, train, self.device, epoch, progress, f"{stage} {epoch + 1}/{epochs}", pool,
                                   self._pool_index if pool is not None and dist.active() else None)
                metrics = dist.average_metrics(run_epoch(ctx))
                dist.broadcast_buffers(list(b.networks.values()))  # BatchNorm running statistics: rank 0's
                for obj in stateful:  # a one-cycle schedule is stepped per batch by the epoch itself
                    if isinstance(obj, torch.optim.lr_scheduler.LRScheduler) and \
                            not isinstance(obj, torch.optim.lr_scheduler.OneCycleLR):
                        obj.step()
                if measure is not None:
                    metrics.update(measure(epoch))
                history.append(metrics)
                self.echo(f"{stage} epoch {epoch + 1}/{epochs}: " + "  ".join(
                    f"{k} {v:.4g}" if k != "img_s" else f"{v:.0f} img/s" for k, v in metrics.items()))
                self._checkpoint(b, stage=stage, epoch=epoch, opt=[o.state_dict() for o in stateful], history=history)
        result: dict[str, Any] = {"epochs": epochs, "history": history}
        if after is not None:
            result.update(after())
        return result

    def _checkpoint(self, b: DefenseBundle, **extra: Any) -> None:
        state = {
            "nets": {n: {k: v.detach().cpu() for k, v in m.state_dict().items()} for n, m in b.networks.items()},
            "completed": list(self._completed),
            "stages_metrics": b.stages,
            "recipe": self.cfg.to_dict(),
            "run_stages": list(self.stages),
            "preset": b.preset,
            "model_config": b.config.to_dict(),
            "class_names": list(b.class_names),
            **extra,
        }
        self.ckpt.save(state)

    # -- main ----------------------------------------------------------------------------
    def run(self) -> DefenseBundle:
        t_all = time.perf_counter()
        _seed_everything(self.cfg.seed)
        size: int | tuple[int, int] = model_preset(self.req.preset).image_size
        if self.req.classifier is not None:
            from ism_edge_training.models.external import classifier_size

            size = classifier_size(self.req.classifier)
        train, calib = self._load_data(size)
        self._absent: set[str] = set()
        b = self._external_bundle(train, calib) if self.req.classifier is not None else self._initial_bundle(train)
        self._pool_index: np.ndarray | None = None
        if self.req.weights_dtype is not None:
            b.weights_dtype = self.req.weights_dtype
        self._completed: list[str] = []
        self._adv_pool: torch.Tensor | None = None
        state: dict[str, Any] = {}
        if self.req.resume:
            ck = self.ckpt.load()
            if ck is None:
                self.echo(f"--resume: no checkpoint at {self.ckpt.path}; starting from scratch")
            else:
                if (not isinstance(ck.get("recipe"), dict) or _recipe_of(ck["recipe"]) != self.cfg
                        or ck.get("preset") != b.preset):
                    raise IsmEdgeError(f"checkpoint {self.ckpt.path} was written with another preset or recipe: "
                                       "rerun with the same options, or delete it and train without --resume")
                run_stages = ck.get("run_stages")
                if run_stages is not None and list(run_stages) != self.stages:
                    # Resuming a --stages run as another would redo (or skip) stages silently.
                    raise IsmEdgeError(f"checkpoint {self.ckpt.path} was written by a run of stages "
                                       f"{','.join(run_stages)}: rerun with --stages {','.join(run_stages)} --resume")
                tuned = self.finetune and "adversarial" in ck.get("completed", [])
                if tuned:  # the fine-tuned copy, exported when its stage completed: the bundle holds it
                    assert self.req.classifier is not None
                    if not (Path(self.req.out) / "manifest.json").is_file():
                        raise BundleError(f"--resume: the adversarial stage completed but {self.req.out} holds "
                                          "no bundle: train without --resume")
                    own = self._own_bundle(Path(self.req.out), b.classifier_record, train)
                    b.networks["classifier"] = own.classifier.to(self.device)
                    b.classifier_record = own.classifier_record
                # With --finetune the checkpoint's classifier is a trainable copy: the adversarial stage's
                # (reloaded here while that stage is not done), or the distill stage's student (which that
                # stage reloads itself), never the exported classifier that the bundle holds.
                exported = self.finetune and (tuned or "adversarial" not in self.stages)
                for n, sd in ck["nets"].items():
                    if n in b.networks and not (exported and n == "classifier"):
                        b.networks[n].load_state_dict(sd)
                self._completed = list(ck.get("completed", []))
                b.stages = dict(ck.get("stages_metrics", {}))
                state = ck
                self.echo(f"--resume: stages done {self._completed or 'none'}; continuing")
        if self.req.init_from is not None:
            self._share_stages(b, Path(self.req.init_from))
        if dist.active():  # the same networks everywhere, then each rank its own random stream
            dist.broadcast_state(list(b.networks.values()))
            _seed_everything(dist.rank_seed(self.cfg.seed))
        n_threads = torch.get_num_threads()
        # What was done to the networks between runs (scripts/factor_classifier.py) stays true of them.
        kept = {k: b.provenance[k] for k in ("factored",) if k in b.provenance}
        b.provenance = {
            **kept,
            "data": train.provenance,
            "n_train": len(train),
            "n_calibration": len(calib),
            "recipe": self.cfg.to_dict(),
            "seed": self.cfg.seed,
            "device": str(self.device),
            "hardware": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                         "torch_threads": n_threads,
                         "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None},
        }
        if dist.active():
            b.provenance["distributed"] = {"world_size": dist.world_size(),
                                           "backend": str(torch.distributed.get_backend()),
                                           "batch_size_per_rank": dist.local_batch(self.cfg.batch_size)}
        # "train": the temperature the deployed logits were trained at (attacks divide by it);
        # "distill": the soft-label temperature of distillation.
        b.temperatures = {"train": self.cfg.teacher_temperature, "deploy": 1.0,
                          "detector": self.cfg.detector_temperature, "distill": self.cfg.temperature}
        b.label_source = self.cfg.label_source
        b.defense = self.spec
        if b.external:
            b.provenance["classifier"] = b.classifier_record["origin"]
            b.temperatures["train"] = 1.0  # the user's logits, as deployed
            skipped = {s: "the user's classifier is frozen (ism-edge train --classifier)" for s in STAGES
                       if s not in FROZEN_CLASSIFIER_STAGES}
            if self.finetune:
                del skipped["adversarial"]
                skipped.update(undefended="the user's classifier is the undefended one (--finetune starts from it)",
                               distill="distillation disabled (--no-distill): the adversarially fine-tuned copy "
                                       "is deployed",
                               finetune="the deployed classifier stays frozen while M and P are trained around it")
                if self.cfg.distill:
                    del skipped["distill"]
                self._check_distilled(b)
            for stage, why in skipped.items():
                b.stages[stage] = {"skipped": why}
        self._check_prerequisites()
        for stage in self.stages:
            self._deploy_undefended(b)
            if stage in self._completed:
                continue
            if stage == "distill" and not self.cfg.distill:
                b.stages[stage] = {"skipped": "distillation disabled: the adversarially trained classifier is deployed"}
                self._completed.append(stage)
                continue
            t0 = time.perf_counter()
            st = state if state.get("stage") == stage else {}
            if stage == "adversarial" and b.external:
                metrics = self._finetune_classifier(b, train, calib, st)
            elif stage == "distill" and b.external:
                metrics = self._distill_finetuned(b, train, calib, st)
            elif stage in ("undefended", "adversarial", "distill"):
                metrics = self._classifier_stage(stage, b, train, calib, st)
            elif stage == "mapper":
                metrics = self._mapper_stage(b, train, calib, st)
            elif stage == "finetune":
                metrics = self._finetune_stage(b, train, calib, st)
            elif stage == "perturbation":
                metrics = self._perturbation_stage(b, train, calib, st)
            else:
                metrics = self._calibrate(b, calib)
            metrics["wall_s"] = round(time.perf_counter() - t0, 1)
            # The options this stage ran with: provenance.recipe is the last run's, which may have run other stages.
            metrics["recipe"] = self.cfg.to_dict()
            b.stages[stage] = metrics
            self._completed.append(stage)
            self._deploy_undefended(b)
            self._checkpoint(b, stage=None, epoch=-1)
            self._save(b)
            self.echo(f"stage {stage} done in {metrics['wall_s']:.0f} s → {self.req.out}")
        self._deploy_undefended(b)
        b.provenance["wall_s_total"] = round(time.perf_counter() - t_all, 1)
        return self._save(b)

    def _share_stages(self, b: DefenseBundle, source: Path) -> None:
        """Take the classifier stages from the bundle at ``source`` instead of training them.

        Baselines trained for a comparison share the classifier stages the recipe allows (the
        undefended classifier; the adversarially trained classifier when it is trained at the
        same temperature with the same options), so the comparison is of the defenses, not of
        two training runs. A run that trains a new M and P around the same C (another mapping
        network, say) shares the distilled classifier too. Refused when the classifier sizes or
        those options differ.
        """
        src = DefenseBundle.load(source)
        clf_fields = ("image_size", "channels", "num_classes", "clf_widths", "clf_dense", "clf_rank", "mean", "std")
        if any(getattr(src.config, f) != getattr(b.config, f) for f in clf_fields) or src.class_names != b.class_names:
            raise BundleError(f"--init-from {source}: its classifier sizes or classes differ from this run's "
                              f"(preset {src.preset!r}): train with the same --preset on the same data")
        src_recipe = src.provenance.get("recipe")
        if not isinstance(src_recipe, dict):
            raise BundleError(f"--init-from {source}: the bundle records no recipe; it cannot be shared")
        mine = self.cfg.to_dict()
        common = ("epochs_classifier", "batch_size", "clf_lr", "lr_schedule", "weight_decay", "augment", "seed")
        adversarial = (*common, "adv_ratio", "adv_eps", "adv_attack", "adv_pgd_steps", "guard_examples",
                       "guard_pgd_steps")
        distill = (*adversarial, "epochs_distill", "temperature", "distill", "distill_method", "distill_init")
        for stage, keys in (("undefended", common), ("adversarial", adversarial), ("distill", distill)):
            if stage not in self.stages or stage in self._completed:
                continue
            if stage == "distill" and not (self.cfg.distill and src_recipe.get("distill")):
                continue  # nothing distilled to share: the stage runs (or is skipped) here
            done = src.stages.get(stage)
            if not isinstance(done, dict) or "skipped" in done:
                raise BundleError(f"--init-from {source}: it has no trained {stage!r} stage to share")
            trained_with = done.get("recipe", src_recipe)  # bundles before per-stage records: the last run's
            if not isinstance(trained_with, dict):
                raise BundleError(f"--init-from {source}: its {stage!r} stage records no recipe; it cannot be shared")
            differ = [k for k in keys if trained_with.get(k) != mine.get(k)]
            src_cfg = _recipe_of({k: v for k, v in trained_with.items() if k != "baseline"})
            if src_cfg is None:
                raise BundleError(f"--init-from {source}: its {stage!r} stage records an invalid recipe; "
                                  "it cannot be shared")
            if stage == "adversarial" and src_cfg.teacher_temperature != self.cfg.teacher_temperature:
                differ.append("teacher temperature")
            if differ:
                raise BundleError(f"--init-from {source}: its {stage!r} stage was trained with other options "
                                  f"({', '.join(differ)}): pass the same options or train the stage here")
            if stage == "undefended":
                src_net, dst_net = src.networks.get("undefended"), b.networks["undefended"]
            elif stage == "distill":
                src_net, dst_net = src.networks.get("classifier"), b.classifier
            else:
                src_net = src.networks.get("teacher" if src_cfg.distill else "classifier")
                dst_net = b.networks["teacher"] if self.cfg.distill else b.classifier
            if src_net is None:
                raise BundleError(f"--init-from {source}: the network of its {stage!r} stage is not in the bundle")
            dst_net.load_state_dict(src_net.state_dict())
            b.stages[stage] = {**done, "recipe": trained_with, "shared_from": str(source),
                               "shared_bundle_sha256": bundle_hash(source)}
            if stage == "distill":  # the source's C as it is now: after its finetune stage, if that ran
                ft = src.stages.get("finetune")
                b.stages[stage]["shared_classifier_after"] = (
                    "finetune" if isinstance(ft, dict) and "skipped" not in ft and ft.get("epochs") else "distill")
            self._completed.append(stage)
            self.echo(f"{stage}: shared from {source} (not trained again)")

    def _deploy_undefended(self, b: DefenseBundle) -> None:
        """Baselines without a defended classifier (none, MagNet) deploy the undefended one."""
        if self.cfg.baseline in ("none", "magnet") and "undefended" in self._completed:
            b.classifier.load_state_dict(b.networks["undefended"].state_dict())

    def _trained_by(self) -> dict[str, set[str]]:
        """The networks each stage fills (baselines without a defended classifier deploy the undefended one)."""
        deploys_undefended = self.cfg.baseline in ("none", "magnet")
        return {"undefended": {"undefended", "classifier"} if deploys_undefended else {"undefended"},
                "adversarial": {"teacher" if self.cfg.distill else "classifier"},
                "distill": {"classifier"}, "mapper": {"mapper", "discriminator"}, "finetune": {"classifier"},
                "perturbation": {"perturbation"}}

    def _untrained(self, completed: list[str] | None = None) -> set[str]:
        """Stand-in networks no stage of this run (trained, shared or resumed; or ``completed``) has filled."""
        trained = self._trained_by()
        done = self._completed if completed is None else completed
        return self._absent - set().union(*(trained.get(s, set()) for s in done))

    def _check_prerequisites(self) -> None:
        """Refuse, before any stage runs, a stage whose input networks no earlier stage has trained:
        M's pool would be crafted against a random classifier, thresholds calibrated on random M and P."""
        needs = {"mapper": {"classifier"}, "finetune": {"classifier", "mapper"},
                 "perturbation": {"classifier", "mapper"}, "calibrate": set(self.spec.required_networks())}
        if self.cfg.distill:
            needs["distill"] = {"teacher"}
        trained = self._trained_by()
        completed = list(self._completed)
        for stage in self.stages:
            if stage in completed:
                continue
            missing = sorted(self._untrained(completed) & needs.get(stage, set()))
            if missing:
                first = min((s for s, nets in trained.items() if nets & set(missing)), key=STAGES.index)
                raise BundleError(f"stage {stage!r} needs a trained {' and '.join(missing)}, which {self.req.out} "
                                  "does not hold (a shipped bundle keeps only the deployed networks, a run of "
                                  f"earlier stages only what they trained): run the {first} stage first, or "
                                  "all stages at once")
            completed.append(stage)

    def _save(self, b: DefenseBundle) -> DefenseBundle:
        """Save the networks the baseline trained (all of them for the full defense); of the stand-ins no stage
        has trained yet, only the deployed ones, which the format needs, marked untrained in the manifest."""
        untrained = self._untrained()
        required = set(self.spec.required_networks())
        # The format needs the deployed networks: their stand-ins are saved, marked untrained.
        b = replace(b, networks={n: m for n, m in b.networks.items() if n not in untrained - required},
                    untrained=tuple(sorted(untrained & required)))
        keep = set(self.spec.required_networks()) | {"undefended"}
        if self.cfg.distill:
            keep.add("teacher")
        if self.spec.needs_mapper and self.cfg.map_adv > 0:
            keep.add("discriminator")
        if self.cfg.baseline != "full":
            b = replace(b, networks={n: m for n, m in b.networks.items() if n in keep})
        if dist.is_main():  # the other ranks wait until the bundle is written
            b.save(self.req.out)
        dist.barrier()
        return b


def _heldout(before: dict[str, Any], after: dict[str, Any], eps: float, names: tuple[str, str]) -> dict[str, Any]:
    """Two guard records (``_guard``) on the same held-out images, as a record's ``heldout`` entry."""
    return {"n": before["n"], "eps": eps, "pgd_steps": before["pgd_steps"],
            **{name: {"clean_acc": g["clean_acc"], "pgd_acc": g["pgd_acc"]}
               for name, g in zip(names, (before, after), strict=True)}}


def _progress() -> contextlib.AbstractContextManager[Any]:
    """Progress bars on rank 0 (or the only process); None on the other ranks."""
    return make_progress() if dist.is_main() else contextlib.nullcontext()


def _quiet(_message: str) -> None:
    """The log of a rank other than 0: rank 0 reports for the job."""


def _recipe_of(d: dict[str, Any]) -> RecipeConfig | None:
    """The recipe a checkpoint was written with (fields added since then take their defaults)."""
    try:
        return RecipeConfig.from_dict(d)
    except (TypeError, ValueError):
        return None


def train_bundle(req: TrainRequest, *, echo: Callable[[str], None] = log) -> DefenseBundle:
    """Run the recipe for ``req`` and return the trained bundle (also saved at ``req.out``)."""
    return RecipeRunner(req, echo=echo).run()
