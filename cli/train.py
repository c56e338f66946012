"""``ism-edge train``: run the defense's training recipe and write a defense bundle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from ism_edge.errors import IsmEdgeError
from ism_edge_cli._common import cli_errors, keep_freed_memory, parse_eps, parse_list, require_training
from ism_edge_cli.choices import Baseline, DataKind, Finetune, Preset


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
    finetune_clean: Annotated[bool, typer.Option(help=(
        "Give the finetune stage the clean images too (raises clean accuracy; --no-finetune-clean: "
        "adversarial and reformed rows only)."))] = True,
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
    map_cls: Annotated[float | None, typer.Option(help=(
        "Weight of the mapping network's classifier-guided term KL(C(x) ‖ C(M(·))): higher keeps reformed "
        "images' labels closer to the clean ones' (0: reconstruction only; default: the recipe's 0.5)."))] = None,
    clf_rank: Annotated[int | None, typer.Option(help=(
        "Factor the classifier's first dense layer to this rank (0: full; the shipped medium bundle's is 128; "
        "default: the preset's)."), min=0)] = None,
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
        "Declare the class names, comma-separated, in label order (implies --num-classes); or a text file "
        "naming one class per line (with --classifier: in the order of the model's outputs; an image folder's "
        "sub-folders carry these names)."))] = None,
    classifier: Annotated[str | None, typer.Option(help=(
        "Protect your own classifier: an .onnx file, or package.module:factory with --weights. It stays frozen "
        "(see --finetune); M, P and the thresholds are trained around it (docs/own-classifier.md)."))] = None,
    finetune: Annotated[Finetune, typer.Option(help=(
        "--classifier: none keeps it frozen; adversarial first runs the recipe's adversarial stage on a copy "
        "(--epochs-classifier, --adv-eps, --adv-attack), then its distillation into a second copy "
        "(--epochs-distill, --temperature; --no-distill deploys the fine-tuned copy), exported back to ONNX with "
        "the same input contract as the bundle's classifier. Your file is not modified."))] = "none",
    weights: Annotated[Path | None, typer.Option(help=(
        "Weights of a --classifier package.module:factory (.safetensors, or a torch.save state dict)."))] = None,
    input_size: Annotated[str | None, typer.Option(help=(
        "--classifier input size, HxW or one side (default: the graph's static size)."))] = None,
    layout: Annotated[str | None, typer.Option(help=(
        "--classifier input layout: nchw or nhwc (default: where the graph's 3-channel axis is; nchw for a "
        "factory)."))] = None,
    channel_order: Annotated[str, typer.Option(help="--classifier channel order: rgb or bgr.")] = "rgb",
    input_scale: Annotated[float, typer.Option(help=(
        "--classifier pixel scale: 1 (pixels in [0, 1]) or 255 (pixels in [0, 255]), before --mean/--std."))] = 1.0,
    mean: Annotated[str, typer.Option(help=(
        "--classifier per-channel mean subtracted after --input-scale, in its channel order (e.g. ImageNet's "
        "0.485,0.456,0.406); 0,0,0 when the graph normalises itself."))] = "0,0,0",
    std: Annotated[str, typer.Option(help=(
        "--classifier per-channel std divided by after the mean (e.g. 0.229,0.224,0.225)."))] = "1,1,1",
    classifier_output: Annotated[str, typer.Option(help=(
        "What --classifier outputs: logits or probabilities."))] = "logits",
    baseline: Annotated[Baseline, typer.Option(help=(
        "What to train: full (the defense), none (undefended classifier), magnet (MagNet: "
        "plain autoencoder + reconstruction/JSD detectors), adv-only (adversarial training alone), "
        "distill-only (defensive distillation alone). Baselines set --adv-ratio/--distill themselves."))] = "full",
    nproc: Annotated[int, typer.Option("--nproc", help=(
        "Data-parallel training in this many processes on this machine (one per GPU with --device cuda), "
        "launched by torch.distributed; --batch-size stays the global batch. Several machines: torchrun "
        "(docs/training.md)."), min=1)] = 1,
    dist_timeout: Annotated[float, typer.Option(help=(
        "Seconds a rank waits for the others at a collective before the job fails (data-parallel runs)."),
        min=10)] = 900.0,
) -> None:
    """Train the full defense (docs/training.md) and write a defense bundle.

    Stages: an undefended classifier (for the oblivious threat model), adversarial training of
    the teacher, (adversarially robust) distillation of the deployed student, the instance
    sparsity mapping network with its discriminator, the perturbation classifier on residuals,
    and calibration of the detector thresholds at --target-fpr on held-out clean data.
    --baseline trains one of the evaluation's baselines with the same code instead.
    Under torchrun (or with --nproc N) every stage runs data-parallel; rank 0 writes the bundle.
    """
    keep_freed_memory()
    require_training("training a defense")
    from ism_edge_training.bundle import WEIGHTS_DTYPES, DefenseBundle
    from ism_edge_training.models import preset as model_preset
    from ism_edge_training.recipe import STAGES, RecipeConfig, TrainRequest

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
            epochs_distill=epochs_distill, epochs_finetune=epochs_finetune, finetune_clean=finetune_clean,
            batch_size=batch_size, lr=lr, clf_lr=clf_lr,
            lr_schedule=lr_schedule,
            adv_ratio=adv_ratio, adv_eps=(eps[0], eps[1]), adv_attack=adv_attack, guard_examples=guard_examples,
            temperature=temperature, distill=distill, distill_method=distill_method, label_source=label_source,
            target_fpr=target_fpr, feedback_rounds=feedback_rounds, seed=seed,
            map_cls=base.map_cls if map_cls is None else map_cls,
        ).for_baseline(baseline)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    overrides = {k: v for k, v in (("sparsity_k", sparsity_k), ("clf_rank", clf_rank)) if v is not None}
    try:  # sizes the preset cannot take are usage errors, before any data is read
        model_preset(preset, **overrides)
    except ValueError as e:
        raise typer.BadParameter(f"{e} (preset {preset})") from None
    req = TrainRequest(data=data, out=out, preset=preset, recipe=recipe, stages=chosen, device=device, resume=resume,
                       data_kind=kind, init_from=init_from, attribute=attribute, exact_only=exact_only, limit=limit,
                       model_overrides=overrides, weights_dtype=weights_dtype)
    source = None
    if classifier is not None:
        source = _classifier_source(classifier, weights, input_size, layout, channel_order, input_scale, mean, std,
                                    classifier_output)
    elif weights is not None or input_size is not None:
        raise typer.BadParameter("--weights and --input-size describe a --classifier: pass one")
    elif finetune != "none":
        raise typer.BadParameter(f"--finetune {finetune} fine-tunes a --classifier: pass one")
    if finetune != "none" and adv_ratio <= 0:
        raise typer.BadParameter(f"--finetune {finetune} trains on adversarial examples: --adv-ratio must be > 0")
    if finetune != "none" and distill and distill_method == "defensive":
        from ism_edge_training.recipe.runner import defensive_with_finetune

        raise typer.BadParameter(defensive_with_finetune(temperature))
    req = replace(req, classifier=source, finetune=finetune)
    names = None if classes is None else _class_names(classes)
    if nproc > 1:
        if batch_size % nproc or batch_size // nproc < 2:
            raise typer.BadParameter(f"--batch-size {batch_size} is the global batch: it must be a multiple of "
                                     f"--nproc {nproc}, at least 2 per process")
        from ism_edge_training.distributed import launch_local

        launch_local(nproc, _train_rank, req, num_classes, names, dist_timeout)
        stages_done = _written(DefenseBundle.load(out))
    else:
        stages_done = _train_rank(req, num_classes, names, dist_timeout)
        if stages_done is None:  # a rank other than 0 of a torchrun job: rank 0 reports
            return
    what = "defense bundle" if baseline == "full" else f"baseline {baseline!r} bundle"
    typer.echo(f"{what} written to {out} (stages: {stages_done})")


def _train_rank(req: Any, num_classes: int | None, names: list[str] | None, timeout_s: float) -> str | None:
    """Train ``req`` in this process: alone, or as one rank of a torchrun / --nproc job.

    Returns the stages of the written bundle, or None on a rank that does not write.
    """
    from ism_edge_training import distributed as dist
    from ism_edge_training.data import declared_classes
    from ism_edge_training.recipe import train_bundle

    with dist.process_group(req.device, timeout_s) as device:
        if device is not None:
            req = replace(req, device=str(device))
        try:
            with declared_classes(num_classes, names):  # the recipe loads the data itself
                bundle = train_bundle(req)
        except RuntimeError as e:  # a peer died or stalled: one line, not the backend's backtrace
            if dist.active() and dist.collective_failed(e):
                raise dist.lost_peer(e) from None
            raise
        except IsmEdgeError as e:
            if dist.active():
                e.args = (f"rank {dist.rank()}: {e}",)
            raise
        return _written(bundle) if dist.is_main() else None


def _written(bundle: Any) -> str:
    """The stages a bundle records, and the deployed networks a run of early stages left untrained."""
    todo = f"; untrained so far: {', '.join(bundle.untrained)}" if bundle.untrained else ""
    return ", ".join(bundle.stages) + todo


def _class_names(classes: str) -> list[str]:
    """``--classes``: comma-separated names, or a file naming one class per line."""
    from ism_edge.errors import DataError

    path = Path(classes)
    if "," not in classes and path.suffix.lower() in (".txt", ".names", ".csv", "") and path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"--classes {path} cannot be read as UTF-8 text ({e})") from None
        names = [line.strip() for line in lines if line.strip()]
        if len(names) < 2 or len(set(names)) != len(names):
            raise DataError(f"--classes {path} must name at least 2 distinct classes, one per line")
        return names
    return [c.strip() for c in classes.split(",")]


def _floats3(text: str, what: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{what} takes three numbers like 0.485,0.456,0.406; got {text!r}") from None
    if len(values) != 3:
        raise typer.BadParameter(f"{what} takes three numbers (one per channel); got {text!r}")
    return values  # type: ignore[return-value]


def _classifier_source(classifier: str, weights: Path | None, input_size: str | None, layout: str | None,
                       channel_order: str, input_scale: float, mean: str, std: str, output: str) -> Any:
    """``--classifier`` and the options of its input contract, checked."""
    from ism_edge_training.models.external import ClassifierSource

    size = None
    if input_size is not None:
        parts = input_size.lower().replace("×", "x").split("x")
        try:
            size = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else None
        except ValueError:
            size = None
        if size is None or min(size) < 1 or max(size) > 4096:
            raise typer.BadParameter(f"--input-size takes HxW or one side in pixels (1 to 4096); got {input_size!r}")
    if layout is not None and layout.lower() not in ("nchw", "nhwc"):
        raise typer.BadParameter(f"--layout must be nchw or nhwc; got {layout!r}")
    if channel_order.lower() not in ("rgb", "bgr"):
        raise typer.BadParameter(f"--channel-order must be rgb or bgr; got {channel_order!r}")
    if input_scale not in (1.0, 255.0):
        raise typer.BadParameter(f"--input-scale must be 1 or 255; got {input_scale:g}")
    if output not in ("logits", "probabilities"):
        raise typer.BadParameter(f"--classifier-output must be logits or probabilities; got {output!r}")
    std3 = _floats3(std, "--std")
    if min(std3) <= 0:
        raise typer.BadParameter(f"--std entries must be > 0; got {std!r}")
    return ClassifierSource(path=classifier, weights=weights, input_size=size,
                            layout=None if layout is None else layout.upper(), channel_order=channel_order.upper(),
                            scale=input_scale, mean=_floats3(mean, "--mean"), std=std3, output=output)
