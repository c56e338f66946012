"""Shared fixtures: real data samples committed under data/samples, and small bundles."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
CIFAR_TRAIN = SAMPLES / "cifar10" / "train.npz"  # 2,000 exact-pixel CIFAR-10 training images
CIFAR_TEST = SAMPLES / "cifar10" / "test.npz"  # 1,017 exact-pixel CIFAR-10 test images

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def cifar_train() -> tuple[np.ndarray, np.ndarray]:
    z = np.load(CIFAR_TRAIN)
    return z["x"], z["y"]


@pytest.fixture(scope="session")
def cifar_test() -> tuple[np.ndarray, np.ndarray]:
    z = np.load(CIFAR_TEST)
    return z["x"], z["y"]


@pytest.fixture(scope="session")
def untrained_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained `small` bundle with placeholder thresholds: for plumbing tests only."""
    pytest.importorskip("torch")
    import torch

    from ism_edge_training.bundle import DefenseBundle
    from ism_edge_training.models import preset

    torch.manual_seed(0)
    b = DefenseBundle.create(preset("small"), [f"c{i}" for i in range(10)], preset="small")
    b.thresholds = {"recon_error": 0.2, "jsd": 0.01, "p_score": 0.5}
    out = tmp_path_factory.mktemp("bundles") / "untrained"
    b.save(out)
    return out


# A small defense trained on the committed real CIFAR-10 sample (about a minute on 2 cores);
# shared by every test that needs trained behaviour (recipe, evaluation, export, runtime).
TRAINED_RECIPE = dict(epochs_classifier=4, epochs_mapper=3, epochs_perturbation=2, batch_size=64, guard_examples=100)


@pytest.fixture(scope="session")
def trained_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from ism_edge_training.recipe import RecipeConfig, TrainRequest, train_bundle

    out = tmp_path_factory.mktemp("bundles") / "trained"
    req = TrainRequest(data=[CIFAR_TRAIN], out=out, preset="small", recipe=RecipeConfig(**TRAINED_RECIPE), device="cpu")
    train_bundle(req, echo=lambda _m: None)
    return out


def set_field(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    """A manifest edit that sets the dotted ``path`` (e.g. ``thresholds.jsd``) to ``value``."""

    def edit(raw: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = raw
        for key in parents:
            node = node[key]
        node[last] = value

    return edit
