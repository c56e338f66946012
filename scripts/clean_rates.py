"""Clean accuracy and false-positive rates of a defense bundle, split into exact-pixel and re-encoded images.

    python scripts/clean_rates.py BUNDLE DATA.npz

DATA is a CIFAR-10 ``*_jpegfill`` .npz file (its ``exact`` flags mark the images with the
official pixels); the labels are the bundle's own (``label_source``), as ``ism-edge run`` gives them.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from ism_edge_training.bundle import DefenseBundle
from ism_edge_training.data import load_dataset
from ism_edge_training.defense import Defense
from ism_edge_training.recipe.stages import defense_scores


def main(bundle_dir: str, data_path: str) -> None:
    bundle = DefenseBundle.load(bundle_dir)
    data = load_dataset([data_path])
    s = defense_scores(Defense(bundle), data, torch.device("cpu"), batch_size=500)
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
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/clean_rates.py BUNDLE DATA.npz")
    main(sys.argv[1], sys.argv[2])
