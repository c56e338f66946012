"""``ism-edge train``: run the defense's training recipe and write a defense bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli._common import cli_errors, keep_freed_memory, parse_eps, parse_list, require_training
from cli.choices import Baseline, DataKind, Preset


@cli_errors
def train(
    data: Annotated[list[Path], typer.Option("--data", help=(
        "Dataset path(s): CIFAR-10 directory (pickle or binary batches), .npz file(s) (several = parts), CelebA root, "
        "or an image folder. Repeat or list several after one --data."))],
    out: Annotated[Path, typer.Option("--out", help="Bundle directory to write (atomically, after every stage).")],
    preset: Annotated[Preset, typer.Option(help=(
        "Model sizes: paper (Tables 1-2, 32x32), medium (the shipped CIFAR-10 defense, CPU hours), "
        "small (CPU minutes), celeba64, celeba128."))] = "small",
    epochs: Annotated[int | None, typer.Option(help=(
        "Epochs for every stage (perturbation classifier: half, at least 1)."))] = None,
    epochs_classifier: Annotated[int | None, typer.Option(help=(
        "Epochs of each classifier stage (undefended, adversarial, distill)."))] = None,
    epochs_mapper: Annotated[int | None, typer.Option(help="Epochs of the mapping-network stage.")] = None,
    epochs_perturbation: Annotated[int | None, typer.Option(help=(
        "Epochs of the perturbation-classifier stage."))] = None,
    epochs_distill: Annotated[int | None, typer.Option(help=(
        "Epochs of the distillation stage (default: --epochs-classifier)."))] = None,
    epochs_finetune: Annotated[int, typer.Option(help=(
        "Epochs of the finetune stage: C on M's outputs beside fresh adversarial examples "
        "(0 = keep C as distilled)."))] = 2,
    stages: Annotated[str, typer.Option(help=(
        "Comma-separated stages to run, in recipe order: undefended, adversarial, distill, mapper, finetune, "
        "perturbation, calibrate."))] = "all",
    resume: Annotated[bool, typer.Option(help="Continue from the last per-epoch checkpoint in OUT.ckpt/.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed (data order, attacks, initialisation).")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 128,
    lr: Annotated[float, typer.Option(help=(
        "Learning rate of the mapping network and P (AdamW, cosine schedule)."))] = 1e-3,
    clf_lr: Annotated[float, typer.Option(help=(
        "Peak learning rate of the classifier stages (AdamW, one-cycle schedule)."))] = 2e-3,
    lr_schedule: Annotated[str, typer.Option(help=(
        "Classifier stages' schedule: onecycle (peak --clf-lr) or cosine (from --lr)."))] = "onecycle",
    adv_ratio: Annotated[float, typer.Option(help=(
        "Fraction of each batch replaced by adversarial examples (0 = no adversarial training)."))] = 1.0,
    adv_eps: Annotated[str, typer.Option(help=(
        "LOW,HIGH range of the training ε (L∞, [0,1] scale; fractions like 8/255 allowed)."))] = "8/255,8/255",
    adv_attack: Annotated[str, typer.Option(help=(
        "Attack for adversarial training: fgsm-rs (random-start FGSM, Wong et al. 2020), fgsm, pgd, "
        "or mixed (FGSM or PGD per batch: the paper's mix)."))] = "fgsm-rs",
    guard_examples: Annotated[int, typer.Option(help=(
        "Held-out images whose PGD accuracy picks the best adversarial epoch (0 = keep the last)."))] = 1000,
    temperature: Annotated[float, typer.Option(help="Distillation temperature T.")] = 20.0,
    distill: Annotated[bool, typer.Option(help=(
        "Run distillation (else deploy the adversarially trained classifier)."))] = True,
    distill_method: Annotated[str, typer.Option(help=(
        "ard (adversarially robust distillation: teacher at T = 1, student on its own adversarial examples, "
        "initialised from the teacher) or defensive (Papernot et al.: teacher and student at T)."))] = "ard",
    label_source: Annotated[str, typer.Option(help=(
        "Labels of the deployed defense: auto (C(x) unless a detector fires, then C(M(x))) "
        "or reformed (always C(M(x)))."))] = "auto",
    sparsity_k: Annotated[int | None, typer.Option(help=(
        "Latent entries kept per instance by the mapping network (default: the preset's)."))] = None,
    target_fpr: Annotated[float, typer.Option(help="False-positive rate each detector is calibrated for.")] = 0.01,
    feedback_rounds: Annotated[int, typer.Option(help=(
        "Feedback-reformation rounds stored in the bundle (0 = off)."), min=0, max=100)] = 0,
    kind: Annotated[DataKind, typer.Option(help="Dataset layout (auto: from the path).")] = "auto",
    attribute: Annotated[str, typer.Option(help="CelebA binary attribute to classify.")] = "Smiling",
    exact_only: Annotated[bool, typer.Option(help=(
        "Keep only exact-pixel images (CIFAR *_jpegfill .npz files)."))] = False,
    limit: Annotated[int | None, typer.Option(help="Use at most this many training images (stratified).")] = None,
    init_from: Annotated[Path | None, typer.Option(help=(
        "Share the undefended and adversarial stages of this bundle instead of training them (same preset, "
        "data and classifier options): baselines for a comparison."))] = None,
    weights_dtype: Annotated[str | None, typer.Option(help=(
        "Store the bundle's weights as float32 or float16 (half the size, for shipping; "
        "training runs in float32 either way). Default: keep the existing bundle's, float32 for a new one."))] = None,
    num_classes: Annotated[int | None, typer.Option(help=(
        "Declare the number of classes: labels outside 0..N-1 are refused. Needed for .npz labels that leave classes "
        "without images."), min=2)] = None,
    classes: Annotated[str | None, typer.Option(help=(
        "Declare the class names, comma-separated, in label order (implies --num-classes)."))] = None,
    baseline: Annotated[Baseline, typer.Option(help=(
        "What to train: full (the defense), none (undefended classifier), magnet (MagNet: "
        "plain autoencoder + reconstruction/JSD detectors), adv-only (adversarial training alone), "
        "distill-only (defensive distillation alone). Baselines set --adv-ratio/--distill themselves."))] = "full",
) -> None:
    """Train the full defense (docs/training.md) and write a defense bundle.

    Stages: an undefended classifier (for the oblivious threat model), adversarial training of
    the teacher, (adversarially robust) distillation of the deployed student, the instance
    sparsity mapping network with its discriminator, the perturbation classifier on residuals,
    and calibration of the detector thresholds at --target-fpr on held-out clean data.
    --baseline trains one of the evaluation's baselines with the same code instead.
    """
    keep_freed_memory()
    require_training("training a defense")
    from dataclasses import replace

    from training.bundle import WEIGHTS_DTYPES
    from training.data import declared_classes
    from training.recipe import STAGES, RecipeConfig, TrainRequest, train_bundle

    eps = parse_eps(adv_eps)
    if len(eps) != 2:
        raise typer.BadParameter("--adv-eps takes LOW,HIGH")
    if weights_dtype is not None and weights_dtype not in WEIGHTS_DTYPES:
        raise typer.BadParameter(f"--weights-dtype must be one of {', '.join(WEIGHTS_DTYPES)}; got {weights_dtype!r}")
    chosen = list(STAGES) if stages.strip().lower() == "all" else parse_list(stages, STAGES, "--stages")
    ec = epochs_classifier if epochs_classifier is not None else epochs
    em = epochs_mapper if epochs_mapper is not None else epochs
    ep = epochs_perturbation if epochs_perturbation is not None else (None if epochs is None else max(1, epochs // 2))
    base = RecipeConfig()
    try:
        recipe = replace(
            base,
            epochs_classifier=base.epochs_classifier if ec is None else ec,
            epochs_mapper=base.epochs_mapper if em is None else em,
            epochs_perturbation=base.epochs_perturbation if ep is None else ep,
            epochs_distill=epochs_distill, epochs_finetune=epochs_finetune, batch_size=batch_size, lr=lr, clf_lr=clf_lr,
            lr_schedule=lr_schedule,
            adv_ratio=adv_ratio, adv_eps=(eps[0], eps[1]), adv_attack=adv_attack, guard_examples=guard_examples,
            temperature=temperature, distill=distill, distill_method=distill_method, label_source=label_source,
            target_fpr=target_fpr, feedback_rounds=feedback_rounds, seed=seed,
        ).for_baseline(baseline)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    req = TrainRequest(data=data, out=out, preset=preset, recipe=recipe, stages=chosen, device=device, resume=resume,
                       data_kind=kind, init_from=init_from, attribute=attribute, exact_only=exact_only, limit=limit,
                       model_overrides={} if sparsity_k is None else {"sparsity_k": sparsity_k},
                       weights_dtype=weights_dtype)
    names = None if classes is None else [c.strip() for c in classes.split(",")]
    with declared_classes(num_classes, names):  # the recipe loads the data itself
        bundle = train_bundle(req)
    what = "defense bundle" if baseline == "full" else f"baseline {baseline!r} bundle"
    typer.echo(f"{what} written to {out} (stages: {', '.join(bundle.stages)})")
