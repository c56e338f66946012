"""``ism-edge evaluate``: accuracy, detection and FPR of a bundle under FGSM/PGD (SPEC §3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli._common import cli_errors, parse_eps, parse_list


@cli_errors
def evaluate(
    bundle: Annotated[Path, typer.Argument(help="Defense bundle directory (from ism-edge train).")],
    data: Annotated[list[Path], typer.Option("--data", help="Held-out data: CIFAR-10 directory (its test batch is used), .npz file(s), CelebA root, image folder.")],
    attacks: Annotated[str, typer.Option(help="Comma-separated attacks: fgsm, pgd.")] = "fgsm,pgd",
    eps: Annotated[str, typer.Option(help="Comma-separated L∞ budgets on the [0,1] scale; fractions allowed.")] = "8/255,0.1,0.2,0.3,0.4",
    threat: Annotated[str, typer.Option(help="Comma-separated threat models: oblivious, known.")] = "oblivious,known",
    n: Annotated[int, typer.Option(help="Number of test images (a fixed random subset; 0 = all).")] = 1000,
    pgd_steps: Annotated[int, typer.Option(help="PGD iterations (step size 2.5·ε/steps, random start).")] = 20,
    pgd_restarts: Annotated[int, typer.Option(help="PGD random restarts.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Evaluation batch size.")] = 200,
    out: Annotated[Path | None, typer.Option(help="Directory for results.json and results.md (default: BUNDLE-eval next to the bundle).")] = None,
    split: Annotated[str, typer.Option(help="Split of a CIFAR-10/CelebA directory: test, train, valid, all.")] = "test",
    kind: Annotated[str, typer.Option(help="Dataset layout: auto, cifar10-pickle, cifar10-binary, npz, celeba, folder.")] = "auto",
    attribute: Annotated[str, typer.Option(help="CelebA binary attribute (must match the bundle's).")] = "Smiling",
    exact_only: Annotated[bool, typer.Option(help="Keep only exact-pixel images (CIFAR *_jpegfill .npz files).")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for the subset and the attacks' random starts.")] = 0,
) -> None:
    """Evaluate a defense bundle: clean accuracy, each detector's FPR, and accuracy / detection /
    defended accuracy under FGSM and PGD at each ε, per threat model; printed and written as JSON."""
    from ism_edge._io import atomic_write_bytes, atomic_write_json
    from ism_edge.errors import IsmEdgeError
    from training.bundle import DefenseBundle, bundle_hash
    from training.data import load_dataset
    from training.evaluation import EvalConfig, evaluate_bundle, markdown_table, rich_table
    from training.progress import console, make_progress
    from training.recipe.runner import resolve_device

    try:
        cfg = EvalConfig(attacks=tuple(parse_list(attacks, ("fgsm", "pgd", "square"), "--attacks")),
                         eps=tuple(parse_eps(eps)),
                         threats=tuple(parse_list(threat, ("oblivious", "known", "adaptive"), "--threat")),
                         n=None if n == 0 else n, batch_size=batch_size, pgd_steps=pgd_steps,
                         pgd_restarts=pgd_restarts, seed=seed)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    b = DefenseBundle.load(bundle)
    arrays = load_dataset(data, kind=kind, split=split, image_size=b.config.image_size, attribute=attribute,
                          exact_only=exact_only, seed=seed)
    if tuple(arrays.class_names) != tuple(b.class_names) and len(arrays.class_names) != len(b.class_names):
        raise IsmEdgeError(f"the data has {len(arrays.class_names)} classes, the bundle {len(b.class_names)}: "
                           "evaluate on the dataset the bundle was trained for")
    dev = resolve_device(device)
    with make_progress() as progress:
        result = evaluate_bundle(b, arrays, cfg, device=dev, progress=progress)
    result["bundle"] = {"path": str(bundle.resolve()), "sha256": bundle_hash(bundle), "preset": b.preset}
    console.print(rich_table(result, title=f"{bundle.name}: {cfg.n or result['n']} images, PGD {pgd_steps} steps"))
    out_dir = out or bundle.with_name(bundle.name + "-eval")
    atomic_write_json(out_dir / "results.json", result)
    atomic_write_bytes(out_dir / "results.md", markdown_table(result).encode())
    typer.echo(f"results written to {out_dir}/results.json and results.md ({result['wall_s']:.0f} s)")
    _ = json  # results are plain JSON
