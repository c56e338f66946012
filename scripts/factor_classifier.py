"""Copy a defense bundle with its classifiers' first dense layer factored to a low rank (truncated SVD).

    python scripts/factor_classifier.py SRC DST --rank R

The dense layer after C's convolutions holds almost all of its weights (``medium``: 8192 × 512,
4.2 M of 4.3 M). Its best rank-R approximation (``networks.factor_classifier``) replaces it in
every classifier of the bundle (the deployed C, and the teacher and undefended classifier where
SRC has them), and the config records ``clf_rank``. This changes the model: the detectors'
thresholds, P (trained on attacks against C) and every figure of the bundle must be measured
again, e.g. ``ism-edge train ... --out DST --stages finetune,perturbation,calibrate`` then
``ism-edge evaluate DST`` (docs/training.md). ``provenance.factored`` records SRC's hash, the rank
and each classifier's relative Frobenius error.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from ism_edge.errors import IsmEdgeError
from ism_edge_training.bundle import DefenseBundle, bundle_hash
from ism_edge_training.models.networks import Classifier, factor_classifier

CLASSIFIERS = ("classifier", "teacher", "undefended")


def factor_bundle(src: Path, dst: Path, rank: int) -> dict[str, float]:
    """Write SRC's bundle to DST with every classifier factored to ``rank``; return each one's error."""
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise IsmEdgeError(f"{dst} is {src} or inside it: write to another directory")
    if dst.exists():
        raise IsmEdgeError(f"{dst} exists: write to a new directory")
    bundle = DefenseBundle.load(src)
    if bundle.external:
        raise IsmEdgeError(f"{src} protects a user's own classifier (an ONNX graph): only ism-edge's own "
                           "classifier can be factored")
    if not 1 <= rank < bundle.config.clf_dense:
        raise IsmEdgeError(f"--rank must be in [1, {bundle.config.clf_dense - 1}] (the dense layer's width "
                           f"is {bundle.config.clf_dense}), got {rank}")
    errors: dict[str, float] = {}
    networks = dict(bundle.networks)
    for name in CLASSIFIERS:
        net = networks.get(name)
        if isinstance(net, Classifier):
            networks[name], errors[name] = factor_classifier(net, bundle.config, rank)
    factored = replace(bundle, config=replace(bundle.config, clf_rank=rank), networks=networks,
                       provenance={**bundle.provenance,
                                   "factored": {"from": str(src), "sha256": bundle_hash(src), "rank": rank,
                                                "relative_error": {n: round(e, 6) for n, e in errors.items()}}})
    factored.save(dst)
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--rank", type=int, required=True, help="rank of the factored dense layer")
    args = parser.parse_args(argv)
    try:
        errors = factor_bundle(args.src, args.dst, args.rank)
    except IsmEdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    shown = ", ".join(f"{n} {e:.1%}" for n, e in errors.items())
    print(f"{args.dst}: dense layer factored to rank {args.rank} (relative error {shown}) from {args.src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
