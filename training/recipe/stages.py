"""The stages of the training recipe (docs/training.md), as plain per-epoch functions.

Each ``*_epoch`` function trains for one epoch and returns its mean metrics; the runner
(``ism_edge_training.recipe.runner``) owns the loop, optimisers, checkpoints and progress display.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from ism_edge_training import distributed as dist
from ism_edge_training.attacks import make_attack
from ism_edge_training.bundle import SCORES
from ism_edge_training.data import ImageArrays
from ism_edge_training.data.torch_utils import iterate_batches, to_tensor
from ism_edge_training.defense import Defense
from ism_edge_training.models import ScaledLogits, sparse_l1
from ism_edge_training.progress import Meter, track
from ism_edge_training.recipe.config import RecipeConfig


@dataclass
class EpochContext:
    """What every epoch function needs besides its networks."""

    cfg: RecipeConfig
    data: ImageArrays
    device: torch.device
    epoch: int
    progress: Progress | None
    description: str
    pool: torch.Tensor | None = None  # adversarial version of every training image (stages 3-4)
    # With several ranks: the training images of this rank's pool rows (``pool`` holds only those).
    pool_index: np.ndarray | None = None

    def batches(self, augment: bool | None = None) -> Any:
        aug = self.cfg.augment if augment is None else augment
        if dist.active():  # this rank's shard of the epoch's permutation, its part of the global batch
            order = np.random.default_rng(np.random.SeedSequence(self.cfg.seed * 1000 + self.epoch).spawn(2)[0])
            idx = dist.shard(order.permutation(len(self.data)))
            return iterate_batches(self.data.subset(idx), dist.local_batch(self.cfg.batch_size), shuffle=False,
                                   seed=dist.rank_seed(self.cfg.seed) * 1000 + self.epoch, augment=aug,
                                   device=self.device)
        it = iterate_batches(self.data, self.cfg.batch_size, shuffle=True, seed=self.cfg.seed * 1000 + self.epoch,
                             augment=aug, device=self.device)
        return it

    def pairs(self) -> Any:
        """Shuffled (clean, adversarial, label) batches from the adversarial pool (no augmentation)."""
        for _, x, x_adv, y in self.indexed_pairs():
            yield x, x_adv, y

    def indexed_pairs(self) -> Any:
        """:meth:`pairs` with the batch's indices into ``data`` first."""
        assert self.pool is not None
        if self.pool_index is not None:  # several ranks: this rank's own pool rows, reshuffled every epoch
            local = np.random.default_rng(dist.rank_seed(self.cfg.seed) * 1000 + self.epoch).permutation(
                len(self.pool_index))
            bs = dist.local_batch(self.cfg.batch_size)
            for start in range(0, len(local), bs):
                rows = np.sort(local[start:start + bs])
                idx = self.pool_index[rows]
                x = to_tensor(self.data.x[idx]).to(self.device)
                y = torch.from_numpy(self.data.y[idx]).long().to(self.device)
                yield idx, x, self.pool[torch.from_numpy(rows)].to(self.device), y
            return
        order = np.random.default_rng(self.cfg.seed * 1000 + self.epoch).permutation(len(self.data))
        for start in range(0, len(order), self.cfg.batch_size):
            idx = np.sort(order[start:start + self.cfg.batch_size])
            x = to_tensor(self.data.x[idx]).to(self.device)
            y = torch.from_numpy(self.data.y[idx]).long().to(self.device)
            yield idx, x, self.pool[torch.from_numpy(idx)].to(self.device), y

    def exact_weights(self, idx: np.ndarray) -> torch.Tensor | None:
        """Per-row loss weights that give exact-pixel and re-encoded images equal total weight.

        ``None`` when the data does not say which images are exact, or all are of one kind. The
        weights average 1 over the whole training set.
        """
        exact = self.data.exact
        if exact is None or exact.all() or not exact.any():
            return None
        share = float(exact.mean())
        w = np.where(exact[idx], 0.5 / share, 0.5 / (1.0 - share)).astype(np.float32)
        return torch.from_numpy(w).to(self.device)

    def clean_pairs(self) -> Any:
        """Shuffled (noisy clean, clean, label) batches: MagNet's denoising-autoencoder inputs.

        The noise is Gaussian with std ``cfg.map_noise`` on [0, 1] pixels, clipped to [0, 1].
        """
        gen = torch.Generator(device="cpu").manual_seed(dist.rank_seed(self.cfg.seed) * 1000 + self.epoch)
        for x, y in self.batches(augment=False):
            noise = torch.randn(x.shape, generator=gen).to(x.device) * self.cfg.map_noise
            yield (x + noise).clamp(0.0, 1.0) if self.cfg.map_noise > 0 else x, x, y

    def n_batches(self) -> int:
        if dist.active():
            n = len(self.pool_index) if self.pool_index is not None else len(dist.shard(np.arange(len(self.data))))
            return -(-n // dist.local_batch(self.cfg.batch_size))
        return -(-len(self.data) // self.cfg.batch_size)

    def rng(self, salt: int) -> random.Random:
        return random.Random(dist.rank_seed(self.cfg.seed) * 1_000_003 + self.epoch * 101 + salt)


def _craft(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, eps: float,
           cfg: RecipeConfig) -> torch.Tensor:
    if kind == "fgsm-rs":  # Wong, Rice & Kolter 2020: a uniform random start, then one FGSM step of 1.25·ε
        return make_attack("pgd", model, eps, steps=1, alpha=1.25 * eps, random_start=True)(x, y)
    kw = {"steps": cfg.adv_pgd_steps} if kind == "pgd" else {}
    return make_attack(kind, model, eps, **kw)(x, y)


def adversarial_mix(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RecipeConfig,
                    rng: random.Random) -> torch.Tensor:
    """Replace the first ``adv_ratio`` of the batch by adversarial examples against ``model``.

    ε is drawn uniformly from ``cfg.adv_eps`` per batch; the attack is ``cfg.adv_attack``
    (:class:`~training.recipe.config.RecipeConfig`). Rows keep their order, so labels and soft
    targets still align.
    """
    n_adv = int(round(cfg.adv_ratio * x.shape[0]))
    if n_adv == 0 or cfg.adv_eps[1] == 0:
        return x
    eps = rng.uniform(*cfg.adv_eps)
    kind = cfg.adv_attack if cfg.adv_attack != "mixed" else rng.choice(("fgsm", "pgd"))
    x_adv = _craft(model, x[:n_adv], y[:n_adv], kind, eps, cfg)
    return torch.cat([x_adv, x[n_adv:]])


def classifier_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    ctx: EpochContext,
    *,
    temperature: float,
    adversarial: bool,
    teacher: nn.Module | None = None,
    teacher_scale: float = 1.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    attack_target: nn.Module | None = None,
) -> dict[str, float]:
    """One epoch of (adversarial) training of a classifier at ``temperature``.

    With a ``teacher`` this is the student of distillation: the targets are
    softmax(teacher(x)·teacher_scale/T) of the clean inputs, for clean and adversarial rows alike
    (adversarial rows crafted against the student: adversarially robust distillation, Goldblum et
    al. 2020; ``teacher_scale`` = 1 for a teacher trained at T = 1, T for one trained at T as in
    defensive distillation, Papernot et al. 2016). ``scheduler`` is stepped after every batch.
    ``attack_target`` is the module adversarial rows are crafted on (default: ``model``'s logits / T).
    """
    meter = Meter()
    rng = ctx.rng(1)
    target = attack_target if attack_target is not None else (
        ScaledLogits(model, 1.0 / temperature) if temperature != 1.0 else model)
    for x, y in track(ctx.progress, ctx.batches(), ctx.n_batches(), ctx.description, meter):
        x_in = adversarial_mix(target, x, y, ctx.cfg, rng) if adversarial else x
        model.train()
        logits = model(x_in)
        if teacher is not None:
            with torch.no_grad():
                soft = F.softmax(teacher(x) * (teacher_scale / temperature), dim=1)
            loss = -(soft * F.log_softmax(logits / temperature, dim=1)).sum(dim=1).mean()
        else:
            loss = F.cross_entropy(logits / temperature, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        acc = (logits.argmax(1) == y).float().mean()
        meter.update(x.shape[0], loss=loss.item(), acc=acc.item())
    return meter.mean()


def heldout_accuracy(model: nn.Module, data: ImageArrays, device: torch.device, *, eps: float = 0.0,
                     steps: int = 10, batch_size: int = 250) -> tuple[float, float]:
    """(clean accuracy, PGD accuracy at ``eps``) of ``model`` on ``data``; PGD is skipped (nan) when ``eps`` is 0.

    PGD: ``steps`` steps of 2.5·ε/steps from a seeded random start, so every epoch is measured
    on the same starts (the guard of the adversarial stages). With several ranks each measures its
    contiguous part and the counts are summed, so every rank returns the same figures.
    """
    correct = robust = 0
    n = max(len(data), 1)
    if dist.active():
        data = data.subset(dist.local_part(len(data)))
    for i, (x, y) in enumerate(iterate_batches(data, batch_size, shuffle=False, device=device)):
        with torch.no_grad():
            model.eval()
            correct += int((model(x).argmax(1) == y).sum())
        if eps > 0:
            x_adv = make_attack("pgd", model, eps, steps=steps, seed=1000 + i)(x, y)
            with torch.no_grad():
                robust += int((model(x_adv).argmax(1) == y).sum())
    correct, robust = dist.sum_all(correct, robust)
    return correct / n, (robust / n if eps > 0 else float("nan"))


class BestEpoch:
    """The weights of the epoch with the highest score so far; checkpointed with the optimiser state."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.epoch = -1
        self.score = float("-inf")
        self.weights: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, score: float) -> bool:
        """Keep the model's current weights if ``score`` is at least the best so far; True if kept."""
        if score >= self.score:
            self.epoch, self.score = epoch, score
            self.weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            return True
        return False

    def restore(self) -> None:
        if self.weights is not None:
            self.model.load_state_dict(self.weights)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "score": self.score, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.score, self.weights = int(state["epoch"]), float(state["score"]), state["weights"]


def mapper_epoch(
    mapper: nn.Module,
    discriminator: nn.Module,
    classifier: nn.Module,
    opt_m: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    ctx: EpochContext,
) -> dict[str, float]:
    """One epoch of the instance sparsity mapping network (paper Eq. 3; docs/paper.md).

    Inputs are attacked x′ (the adversarial pool: FGSM/PGD against the deployed classifier) and
    clean x, both mapped to the clean x: MSE reconstruction + L1 on the k-sparse code + the
    non-saturating generator loss of a discriminator D that tells clean images from M's outputs +
    a classifier-guided term KL(C(x) ‖ C(M(·))) that keeps the reformed image classifiable.
    ``classifier`` should be the attack surrogate (logits / T for a distilled C), so the guided
    term is not saturated. Without an adversarial pool (``cfg.map_pairs=False``: the MagNet
    baseline) the inputs are the clean images with Gaussian noise (:meth:`EpochContext.clean_pairs`);
    with ``cfg.map_adv = 0`` D is not trained.
    """
    cfg = ctx.cfg
    meter = Meter()
    classifier.eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    try:
        pairs = ctx.pairs() if ctx.pool is not None else ctx.clean_pairs()
        for x, x_adv, y in track(ctx.progress, pairs, ctx.n_batches(), ctx.description, meter):
            if ctx.pool is not None:
                inp, tgt = torch.cat([x_adv, x]), torch.cat([x, x])
            else:  # x is the noisy input, x_adv the clean target
                inp, tgt, x = x, x_adv, x_adv
            mapper.train()
            d_loss = torch.zeros(())
            if cfg.map_adv > 0:
                # Discriminator step: clean images are real, M's outputs are fake.
                discriminator.train()
                with torch.no_grad():
                    fake = mapper(inp)
                d_real = discriminator(x)
                d_fake = discriminator(fake)
                d_loss = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real)) + \
                    F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
            # Mapping-network step.
            out, z = mapper.forward_with_code(inp)
            rec = F.mse_loss(out, tgt)
            loss = rec + cfg.map_l1 * sparse_l1(z)
            if cfg.map_adv > 0:
                g = discriminator(out)
                loss = loss + cfg.map_adv * F.binary_cross_entropy_with_logits(g, torch.ones_like(g))
            if cfg.map_cls > 0:
                with torch.no_grad():
                    p_clean = F.softmax(classifier(x), dim=1)  # both halves of tgt are x
                p_tgt = torch.cat([p_clean, p_clean])
                logits_out = classifier(out)
                loss = loss + cfg.map_cls * F.kl_div(F.log_softmax(logits_out, dim=1), p_tgt, reduction="batchmean")
            else:
                with torch.no_grad():
                    logits_out = classifier(out)
            opt_m.zero_grad(set_to_none=True)
            loss.backward()
            opt_m.step()
            n = x.shape[0]
            acc_adv = (logits_out[:n].argmax(1) == y).float().mean()
            acc_key = "acc_reformed_adv" if ctx.pool is not None else "acc_reformed"
            meter.update(n, loss=loss.item(), rec=rec.item(), d=d_loss.item(), **{acc_key: acc_adv.item()})
    finally:
        for p in classifier.parameters():
            p.requires_grad_(True)
    return meter.mean()


def camera_variations(clean: torch.Tensor, attacked: torch.Tensor, fraction: float,
                      rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Give ``fraction`` of the (clean, attacked) pairs one camera variation, the same on both images.

    Each chosen pair gets one of: JPEG re-encoding at quality 40–95, Gaussian sensor noise of std
    1–4/255, or a Gaussian blur of σ 0.4–0.9 px; a noise draw is shared by the two images of a pair.
    Clean and attacked images are processed alike, so the variation says nothing about the label.
    """
    import cv2

    if fraction <= 0:
        return clean, attacked
    n = clean.shape[0]
    chosen = np.flatnonzero(rng.random(n) < fraction)
    if chosen.size == 0:
        return clean, attacked
    clean, attacked = clean.clone(), attacked.clone()
    pair = torch.stack([clean[chosen], attacked[chosen]], dim=1)  # (k, 2, C, H, W)
    u8 = (pair.permute(0, 1, 3, 4, 2).cpu().numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    out = u8.astype(np.float32)
    for i in range(len(chosen)):
        kind = int(rng.integers(3))
        if kind == 0:
            quality = int(rng.integers(40, 96))
            for j in range(2):
                ok, buf = cv2.imencode(".jpg", u8[i, j], [cv2.IMWRITE_JPEG_QUALITY, quality])
                if ok:
                    dec = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
                    out[i, j] = dec.reshape(u8[i, j].shape)
        elif kind == 1:
            noise = rng.normal(0.0, rng.uniform(1.0, 4.0), size=u8[i, 0].shape).astype(np.float32)
            out[i] = u8[i] + noise[None]
        else:
            sigma = float(rng.uniform(0.4, 0.9))
            for j in range(2):
                out[i, j] = cv2.GaussianBlur(u8[i, j].astype(np.float32), (0, 0), sigma).reshape(u8[i, j].shape)
    varied = torch.from_numpy(out.clip(0, 255) / 255.0).permute(0, 1, 4, 2, 3).to(clean)
    idx = torch.from_numpy(chosen).to(clean.device)
    clean[idx] = varied[:, 0]
    attacked[idx] = varied[:, 1]
    return clean, attacked


def finetune_epoch(
    classifier: nn.Module,
    mapper: nn.Module,
    opt: torch.optim.Optimizer,
    ctx: EpochContext,
    *,
    attack_target: nn.Module,
    temperature: float,
) -> dict[str, float]:
    """One epoch of fine-tuning C on M's outputs (stage ``finetune``), keeping its robustness.

    Every batch of the adversarial pool gives three rows per image, each with the true label:
    a fresh adversarial example crafted against C (``cfg.adv_attack`` at ``cfg.adv_eps``, as in
    adversarial training), M(x) and M(x′) with x′ the pool's attacked version — and, with
    ``cfg.finetune_clean``, a fourth: the clean x itself, which buys back clean accuracy that
    adversarial training alone gives away (the rows weigh alike). The loss is the mean
    cross-entropy of C's logits / ``temperature`` (the temperature C was trained at).
    """
    meter = Meter()
    rng = ctx.rng(3)
    mapper.eval()
    for x, x_adv, y in track(ctx.progress, ctx.pairs(), ctx.n_batches(), ctx.description, meter):
        fresh = adversarial_mix(attack_target, x, y, ctx.cfg, rng)
        with torch.no_grad():
            reformed = mapper(torch.cat([x, x_adv]))
        rows = [fresh, reformed, x] if ctx.cfg.finetune_clean else [fresh, reformed]
        classifier.train()
        logits = classifier(torch.cat(rows))
        n = x.shape[0]
        labels = y.repeat(logits.shape[0] // n)
        loss = F.cross_entropy(logits / temperature, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hit = (logits.argmax(1) == labels).float()
        extra = {"acc_clean": hit[3 * n:].mean().item()} if ctx.cfg.finetune_clean else {}
        meter.update(n, loss=loss.item(), acc_adv=hit[:n].mean().item(), acc_reformed=hit[n:2 * n].mean().item(),
                     acc_reformed_adv=hit[2 * n:3 * n].mean().item(), **extra)
    return meter.mean()


def perturbation_epoch(
    perturbation: nn.Module,
    mapper: nn.Module,
    classifier: nn.Module,
    opt: torch.optim.Optimizer,
    ctx: EpochContext,
) -> dict[str, float]:
    """One epoch of the perturbation classifier P on residuals r = x − M(x) (docs/paper.md).

    Every batch is used twice: clean (label 0) and its adversarial-pool version (label 1), a
    fraction ``cfg.pert_variations`` of the pairs with the same camera variation on both
    (:func:`camera_variations`). With ``cfg.pert_balance_exact`` the exact-pixel pairs weigh as
    much in the loss as the re-encoded ones (:meth:`EpochContext.exact_weights`): in a training
    set of mostly JPEG-decoded images, "sharp" would otherwise mean "attacked" to P.
    """
    meter = Meter()
    mapper.eval()
    rng = np.random.default_rng(ctx.cfg.seed * 1000 + ctx.epoch + 7)
    for idx, x, x_adv, _ in track(ctx.progress, ctx.indexed_pairs(), ctx.n_batches(), ctx.description, meter):
        x, x_adv = camera_variations(x, x_adv, ctx.cfg.pert_variations, rng)
        inp = torch.cat([x, x_adv])
        target = torch.cat([torch.zeros(x.shape[0]), torch.ones(x.shape[0])]).to(inp.device)
        with torch.no_grad():
            residual = inp - mapper(inp)
        perturbation.train()
        logit = perturbation(residual)
        w = ctx.exact_weights(idx) if ctx.cfg.pert_balance_exact else None
        loss = F.binary_cross_entropy_with_logits(logit, target, weight=None if w is None else torch.cat([w, w]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = ((logit > 0).float() == target).float().mean()
        meter.update(x.shape[0], loss=loss.item(), acc=acc.item())
    return meter.mean()


def adversarial_pool(model: nn.Module, data: ImageArrays, cfg: RecipeConfig, device: torch.device,
                     progress: Progress | None = None) -> torch.Tensor:
    """One adversarial version of every training image, crafted once against the frozen ``model``.

    The classifier no longer changes in stages 3 and 4, so their (attacked, clean) pairs can be
    crafted once instead of every epoch. Each batch draws its attack from ``pert_attacks`` and its
    ε from ``pert_eps`` (several attack types and levels, docs/paper.md). Returned on the CPU.
    """
    rng = random.Random(dist.rank_seed(cfg.seed) * 7919 + 17)
    pool = torch.empty((len(data), data.x.shape[3], data.x.shape[1], data.x.shape[2]), dtype=torch.float32)
    meter = Meter()
    it = range(0, len(data), cfg.batch_size)
    for start in track(progress, it, len(it), "adversarial pool", meter):
        x = to_tensor(data.x[start:start + cfg.batch_size]).to(device)
        y = torch.from_numpy(data.y[start:start + cfg.batch_size]).long().to(device)
        pool[start:start + x.shape[0]] = _craft(model, x, y, rng.choice(cfg.pert_attacks), rng.choice(cfg.pert_eps),
                                                cfg).cpu()
        meter.update(x.shape[0])
    return pool


@torch.no_grad()
def defense_scores(defense: Defense, data: ImageArrays, device: torch.device,
                   batch_size: int = 256) -> dict[str, np.ndarray]:
    """Run the defense on clean data; return numpy arrays of every score, labels and flags.

    With several ranks each scores its contiguous part and the arrays are gathered in rank order:
    every rank returns the scores of all of ``data``, in its order.
    """
    if dist.active():
        data = data.subset(dist.local_part(len(data)))
    out: dict[str, list[np.ndarray]] = {"recon_error": [], "jsd": [], "p_score": [], "label": [], "label_raw": [],
                                        "label_reformed": [], "flagged": []}
    defense.eval()
    for x, _ in iterate_batches(data, batch_size, shuffle=False, device=device):
        o = defense(x)
        for k, v in o.scores().items():
            out[k].append(v.float().cpu().numpy())
        out["label"].append(o.label.cpu().numpy())
        out["label_raw"].append(o.logits_raw.argmax(1).cpu().numpy())
        out["label_reformed"].append(o.logits_reformed.argmax(1).cpu().numpy())
        out["flagged"].append(o.flagged.cpu().numpy())
    return dist.gather_arrays({k: np.concatenate(v) if v else np.empty(0) for k, v in out.items()})


def calibrate_thresholds(scores: dict[str, np.ndarray], target_fpr: float,
                         detectors: tuple[str, ...] = SCORES,
                         groups: list[np.ndarray] | None = None) -> dict[str, float]:
    """Per-detector threshold = the (1 − target_fpr) quantile of its score on clean data.

    A score strictly above the threshold flags the input, so on the calibration data each
    detector's false-positive rate is at most ``target_fpr`` (MagNet's calibration). Only the
    deployed ``detectors`` get a threshold. With ``groups`` (boolean masks, e.g. exact-pixel and
    re-encoded images) the threshold is the largest of the groups' quantiles, so the rate holds
    within every group, not only on their mix.
    """
    masks = [g for g in groups if g.any()] if groups else [np.ones(len(next(iter(scores.values()))), dtype=bool)]
    return {k: max(float(np.quantile(scores[k][m], 1.0 - target_fpr, method="higher")) for m in masks)
            for k in detectors}
