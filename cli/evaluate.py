"""``ism-edge evaluate``: the defense and its baselines under oblivious, known and adaptive attacks
(docs/evaluation.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ism_edge_cli._common import cli_errors, keep_freed_memory, parse_eps, parse_list, require_training
from ism_edge_cli.choices import DataKind


def _names(baselines: list[str], dirs: list[Path]) -> list[str]:
    """Report labels: the baseline name, with the directory name where two bundles share one."""
    return [b if baselines.count(b) == 1 else f"{b} ({d.name})" for b, d in zip(baselines, dirs, strict=True)]


def _earlier_results(out_dir: Path) -> dict[str, tuple[dict[str, Any], dict[str, Any] | None]]:
    """Bundle hash → (result, cross-check or None) of an earlier run's ``results.json`` in ``out_dir``.

    The file is data: anything that is not the shape this command writes is refused with one line.
    """
    from ism_edge._checks import read_json
    from ism_edge.errors import IsmEdgeError

    path = out_dir / "results.json"
    if not path.is_file():
        return {}
    try:
        raw = read_json(path)
    except (OSError, ValueError) as e:
        raise IsmEdgeError(f"--resume: cannot read {path}: {e}") from None
    bundles = raw.get("bundles") if isinstance(raw, dict) else None
    checks = raw.get("crosscheck") or [] if isinstance(raw, dict) else []
    if not isinstance(bundles, list) or not isinstance(checks, list) or \
            not all(isinstance(r, dict) and isinstance(r.get("bundle"), dict) and isinstance(r.get("config"), dict)
                    and isinstance(r["bundle"].get("sha256"), str) for r in bundles) or \
            not all(isinstance(c, dict) for c in checks):
        raise IsmEdgeError(f"--resume: {path} is not an ism-edge evaluate report: write to another --out")
    # Cross-checks are appended in the order of the bundles (one per bundle, or none at all).
    return {r["bundle"]["sha256"]: (r, checks[i] if len(checks) == len(bundles) else None)
            for i, r in enumerate(bundles)}


def _same(a: Any, b: Any) -> bool:
    """Equal once both went through JSON (tuples and lists alike), as a report stores them."""
    return json.loads(json.dumps(a, default=str)) == json.loads(json.dumps(b, default=str))


# What the evaluation's own subset (--n, --seed: in the config) changes in the data's provenance.
_SUBSET_KEYS = ("n", "class_counts", "selection", "n_exact")


def _same_source(stored: Any, data: dict[str, Any]) -> bool:
    """Whether a report's data provenance (of its subset) is of the same files as ``data`` (all of it)."""
    if not isinstance(stored, dict):
        return False
    return _same({k: v for k, v in stored.items() if k not in _SUBSET_KEYS},
                 {k: v for k, v in data.items() if k not in _SUBSET_KEYS})


@cli_errors
def evaluate(
    bundles: Annotated[list[Path], typer.Argument(help=(
        "Defense bundle directories (from ism-edge train; baselines with --baseline), evaluated on the same images."))],
    data: Annotated[list[Path], typer.Option("--data", help=(
        "Held-out data: CIFAR-10 directory (its test batch is used), .npz file(s), CelebA root, image folder."))],
    attacks: Annotated[str, typer.Option(help=(
        "Comma-separated attacks: fgsm, pgd, square (score-based black-box)."))] = "fgsm,pgd",
    eps: Annotated[str, typer.Option(help=(
        "Comma-separated L∞ budgets on the [0,1] scale; fractions allowed."))] = "8/255,0.1,0.2,0.3,0.4",
    adaptive_eps: Annotated[str | None, typer.Option(help=(
        "Budgets of the adaptive threat model, comma-separated (default: as --eps); each of its steps "
        "runs the whole defense, so a long evaluation may keep it to 8/255."))] = None,
    threat: Annotated[str, typer.Option(help=(
        "Comma-separated threat models: oblivious (crafted on an undefended classifier), known (on the deployed C), "
        "adaptive (through the whole defense and its detectors)."))] = "oblivious,known,adaptive",
    n: Annotated[int, typer.Option(help=(
        "Number of test images (a fixed random subset, the same for every bundle; 0 = all)."))] = 100,
    pgd_steps: Annotated[int, typer.Option(help=(
        "PGD iterations against a classifier (step 2.5·ε/steps, random start)."))] = 20,
    pgd_restarts: Annotated[int, typer.Option(help="PGD random restarts.")] = 1,
    adaptive_steps: Annotated[int, typer.Option(help="Iterations of the adaptive PGD through the defense.")] = 50,
    adaptive_restarts: Annotated[int, typer.Option(help="Random restarts of the adaptive PGD.")] = 1,
    adaptive_bpda: Annotated[str, typer.Option(help=(
        "Adaptive gradients: none (exact), feedback (BPDA on the feedback rounds) or mapper (BPDA on M)."))] = "none",
    square_queries: Annotated[int, typer.Option(help="Query budget per image of the Square attack.")] = 1000,
    sanity: Annotated[bool, typer.Option(help=(
        "Run the extra cells of the sanity checks (ε = 0, ε = 1, twice the steps)."))] = True,
    crosscheck: Annotated[bool, typer.Option(help=(
        "Also run ART's PGD, APGD-CE and APGD-DLR on the same models "
        "(needs adversarial-robustness-toolbox)."))] = False,
    crosscheck_n: Annotated[int | None, typer.Option(help=(
        "Images of the cross-check (a subset of the evaluated ones; default: as --n, 0 = all)."), min=0)] = None,
    crosscheck_eps: Annotated[str | None, typer.Option(help=(
        "ε of the cross-check, comma-separated (default: as --eps)."))] = None,
    batch_size: Annotated[int, typer.Option(help="Evaluation batch size.")] = 200,
    out: Annotated[Path | None, typer.Option(help=(
        "Directory for results.json/.md/.csv and accuracy_vs_eps.png (default: BUNDLE-eval for one bundle, "
        "./ism-edge-eval for several)."))] = None,
    split: Annotated[str, typer.Option(help="Split of a CIFAR-10/CelebA directory: test, train, valid, all.")] = "test",
    kind: Annotated[DataKind, typer.Option(help="Dataset layout (auto: from the path).")] = "auto",
    attribute: Annotated[str, typer.Option(help="CelebA binary attribute (must match the bundle's).")] = "Smiling",
    exact_only: Annotated[bool, typer.Option(help=(
        "Keep only exact-pixel images (CIFAR *_jpegfill .npz files)."))] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for the subset and the attacks' random starts.")] = 0,
    resume: Annotated[bool, typer.Option(help=(
        "Reuse the results an earlier run wrote to --out for bundles with the same contents (hash), images "
        "and options, and evaluate only the others: a long comparison can be split over runs."))] = False,
) -> None:
    """Evaluate defense bundles on the same images: for every threat model, attack and ε, clean
    accuracy, accuracy under attack, detection rate, FPR on clean data and defended accuracy
    (flagged or correct), with sanity checks and the paper's claims alongside; written as a
    Markdown table, CSV, JSON and a plot of accuracy vs ε."""
    keep_freed_memory()
    require_training("evaluating a defense")
    import sys
    from dataclasses import replace

    from ism_edge._io import atomic_write_bytes, atomic_write_json
    from ism_edge.errors import IsmEdgeError
    from ism_edge_training.bundle import DefenseBundle, bundle_hash, library_versions
    from ism_edge_training.data import load_dataset
    from ism_edge_training.evaluation import (
        EvalConfig,
        csv_text,
        evaluate_bundle,
        markdown_report,
        plot_accuracy_vs_eps,
        rich_table,
    )
    from ism_edge_training.progress import console, make_progress
    from ism_edge_training.recipe.runner import resolve_device

    try:
        cfg = EvalConfig(attacks=tuple(parse_list(attacks, ("fgsm", "pgd", "square"), "--attacks")),
                         eps=tuple(parse_eps(eps)),
                         threats=tuple(parse_list(threat, ("oblivious", "known", "adaptive"), "--threat")),
                         n=None if n == 0 else n, batch_size=batch_size, pgd_steps=pgd_steps,
                         pgd_restarts=pgd_restarts, adaptive_steps=adaptive_steps, adaptive_restarts=adaptive_restarts,
                         adaptive_bpda=adaptive_bpda, square_queries=square_queries, sanity=sanity, seed=seed,
                         adaptive_eps=None if adaptive_eps is None else tuple(parse_eps(adaptive_eps)))
        check_cfg = replace(cfg, n=cfg.n if crosscheck_n is None else (crosscheck_n or None),
                            eps=cfg.eps if crosscheck_eps is None else tuple(parse_eps(crosscheck_eps)))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if cfg.n is not None and (check_cfg.n is None or check_cfg.n > cfg.n):
        raise typer.BadParameter(f"--crosscheck-n must not exceed --n ({cfg.n})")
    if crosscheck:
        from ism_edge_training.evaluation.crosscheck import ART_PACKAGE, art_version

        if art_version() is None:
            raise IsmEdgeError(f"--crosscheck needs the Adversarial Robustness Toolbox, which is not installed: "
                               f"pip install {ART_PACKAGE} (or 'ism-edge[eval]'), or drop --crosscheck")
    out_dir = out or (bundles[0].with_name(bundles[0].name + "-eval") if len(bundles) == 1 else Path("ism-edge-eval"))
    earlier = _earlier_results(out_dir) if resume else {}  # a report that cannot be resumed: refused before any work
    loaded = [DefenseBundle.load(b) for b in bundles]
    for path, b in zip(bundles, loaded, strict=True):
        b.refuse_untrained(path, "evaluated")
    first = loaded[0]
    for path, b in zip(bundles[1:], loaded[1:], strict=True):
        if tuple(b.class_names) != tuple(first.class_names) or b.input_shape != first.input_shape:
            raise IsmEdgeError(f"{path} was trained on other classes or another image size than {bundles[0]}: "
                               "evaluate bundles of one dataset together")
    size = first.input_shape[1:] if first.external else first.config.image_size
    # A user's classifier's bundle names its classes in the model's output order: an image folder's
    # sub-folders of those names are labelled in that order.
    names = first.class_names if first.external else None
    arrays = load_dataset(data, kind=kind, split=split, image_size=size, attribute=attribute,
                          exact_only=exact_only, seed=seed, class_names=names)
    if len(arrays.class_names) != len(first.class_names):
        raise IsmEdgeError(f"the data has {len(arrays.class_names)} classes, the bundle {len(first.class_names)}: "
                           "evaluate on the dataset the bundle was trained for")
    dev = resolve_device(device)
    names = _names([b.defense.baseline for b in loaded], list(bundles))
    results = []
    checks = []
    # No progress bar is drawn into a pipe or a log: a line per finished cell instead.
    echo = None if console.is_terminal else (lambda line: typer.echo(line, err=True))
    command = "ism-edge " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("ism-edge") else None

    def write_reports() -> None:
        """All reports of the bundles evaluated so far: rewritten after each one, so a long run that
        is stopped keeps what it finished (``complete`` false and ``pending`` in results.json)."""
        pending = names[len(results):]
        title = f"{', '.join(r['name'] for r in results)}: {results[0]['n']} images" + (
            f" (partial: {', '.join(pending)} not evaluated yet)" if pending else "")
        atomic_write_json(out_dir / "results.json", {"bundles": results, "crosscheck": checks or None,
                                                     "command": command, "complete": not pending, "pending": pending,
                                                     "versions": library_versions()})
        report = markdown_report(results, title=f"Evaluation: {title}")
        if checks:
            from ism_edge_training.evaluation.crosscheck import crosscheck_markdown

            report += "\n## Cross-check with the Adversarial Robustness Toolbox\n\n" + crosscheck_markdown(checks)
            atomic_write_bytes(out_dir / "crosscheck.md", crosscheck_markdown(checks).encode())
        atomic_write_bytes(out_dir / "results.md", report.encode())
        atomic_write_bytes(out_dir / "results.csv", csv_text(results).encode())
        plot_accuracy_vs_eps(results, out_dir / "accuracy_vs_eps.png")

    with make_progress() as progress:
        for path, b, name in zip(bundles, loaded, names, strict=True):
            digest = bundle_hash(path)
            old, old_check = earlier.get(digest, ({}, None))
            if old and _same(old.get("config"), cfg.to_dict()) and _same_source(old.get("data"), arrays.provenance):
                r = {**old, "name": name}
                typer.echo(f"{name}: results of {out_dir / 'results.json'} reused (same bundle, images and options)",
                           err=True)
            else:
                r = evaluate_bundle(b, arrays, cfg, device=dev, progress=progress, name=name, echo=echo)
                old_check = None
            r["bundle"] = {"path": str(path.resolve()), "sha256": digest, "preset": b.preset,
                           "baseline": b.defense.baseline}
            if crosscheck:
                from ism_edge_training.evaluation.crosscheck import crosscheck as run_crosscheck

                if old_check is not None and _same(old_check.get("config"), check_cfg.to_dict()):
                    checks.append({**old_check, "name": name})
                else:
                    check = run_crosscheck(b, arrays, check_cfg, device=dev, progress=progress, name=name, echo=echo)
                    checks.append({**check, "config": check_cfg.to_dict()})
            results.append(r)
            write_reports()
    console.print(rich_table(results, title=f"{', '.join(names)}: {results[0]['n']} images"))
    failed = [f"{r['name']}: {c['name']}" for r in results for c in r["sanity"] if c["passed"] is False]
    if failed:
        typer.echo("sanity checks FAILED (the numbers above are not trustworthy where they apply): "
                   + "; ".join(failed), err=True)
    wall = sum(r["wall_s"] for r in results) + sum(c["wall_s"] for c in checks)
    typer.echo(f"results written to {out_dir}/: results.md, results.csv, results.json, accuracy_vs_eps.png"
               f"{', crosscheck.md' if checks else ''} ({wall:.0f} s)")
