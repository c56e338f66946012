"""Clean accuracy and false-positive rates of a defense bundle, split into exact-pixel and re-encoded images.

    python scripts/clean_rates.py BUNDLE DATA.npz [--mapper-from BUNDLE.ckpt/checkpoint.pt]

DATA is a CIFAR-10 ``*_jpegfill`` .npz file (its ``exact`` flags mark the images with the
official pixels); the labels are the bundle's own (``label_source``), as ``ism-edge run`` gives them.
``--mapper-from`` puts the mapping network of a training checkpoint (``ism-edge train``'s per-epoch
``checkpoint.pt``) into the bundle first, to measure M's cost (C(x) against C(M(x))) in the middle
of a run; the false-positive rates are then those of the bundle's thresholds, set for its own M.
"""

from __future__ import annotations

import argparse
import pickle
import sys

import numpy as np
import torch

from ism_edge.errors import IsmEdgeError
from ism_edge_training.bundle import DefenseBundle
from ism_edge_training.data import load_dataset
from ism_edge_training.defense import Defense
from ism_edge_training.recipe.stages import defense_scores


def checkpoint_mapper(bundle: DefenseBundle, path: str) -> str:
    """Load the mapping network of the training checkpoint at ``path`` into ``bundle``; a description."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        bundle.mapper.load_state_dict(ck["nets"]["mapper"])
    # unreadable, not a checkpoint, or one of another network
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        why = str(e).splitlines()[0][:200] if str(e) else ""
        raise IsmEdgeError(f"{path}: not a training checkpoint holding this bundle's mapping network "
                           f"({type(e).__name__}: {why})") from None
    return f"M from {path} (stage {ck.get('stage')}, epoch {int(ck.get('epoch', -1)) + 1})"


def main(bundle_dir: str, data_path: str, mapper_from: str | None = None) -> None:
    bundle = DefenseBundle.load(bundle_dir)
    if mapper_from is not None:
        print(checkpoint_mapper(bundle, mapper_from))
    data = load_dataset([data_path])
    s = defense_scores(Defense(bundle.eval()), data, torch.device("cpu"), batch_size=500)
    exact = data.exact if data.exact is not None else np.ones(len(data), dtype=bool)
    for name, m in (("all", np.ones(len(data), dtype=bool)), ("exact", exact), ("re-encoded", ~exact)):
        if not m.any():
            continue
        y = data.y[m]
        per = "  ".join(f"{k} {float((s[k][m] > v).mean()):.2%}" for k, v in bundle.thresholds.items())
        print(f"{name}: n {int(m.sum())}  labels {np.mean(s['label'][m] == y):.2%}  "
              f"C(x) {np.mean(s['label_raw'][m] == y):.2%}  C(M(x)) {np.mean(s['label_reformed'][m] == y):.2%}  "
              f"FPR any {s['flagged'][m].mean():.2%}  {per}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("data")
    parser.add_argument("--mapper-from", metavar="CHECKPOINT", help="a training checkpoint whose M to measure")
    a = parser.parse_args()
    try:
        main(a.bundle, a.data, a.mapper_from)
    except IsmEdgeError as e:
        sys.exit(f"error: {e}")
