"""Baselines trained by the same recipe: what each bundle deploys, and the defense honouring it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ism_edge.errors import IsmEdgeError  # noqa: E402
from ism_edge_training.attacks import AdaptiveAttack  # noqa: E402
from ism_edge_training.bundle import DefenseBundle, DefenseSpec, read_bundle_manifest  # noqa: E402
from ism_edge_training.data import load_dataset  # noqa: E402
from ism_edge_training.data.torch_utils import to_tensor  # noqa: E402
from ism_edge_training.defense import Defense  # noqa: E402
from ism_edge_training.evaluation import EvalConfig, evaluate_bundle  # noqa: E402
from ism_edge_training.recipe import RecipeConfig, TrainRequest, train_bundle  # noqa: E402
from ism_edge_training.recipe.runner import clean_accuracy  # noqa: E402
from tests.conftest import CIFAR_TEST, CIFAR_TRAIN  # noqa: E402

LIMIT = 300
TINY = dict(epochs_classifier=1, epochs_mapper=1, epochs_perturbation=1, batch_size=64, adv_attack="fgsm")
FILES = {
    "none": {"classifier", "undefended"},
    "magnet": {"classifier", "undefended", "mapper"},
    "adv-only": {"classifier", "undefended"},
    "distill-only": {"classifier", "undefended", "teacher"},
}


@pytest.fixture(scope="module")
def baselines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("baselines")
    out = {}
    for name in FILES:
        req = TrainRequest(data=[CIFAR_TRAIN], out=root / name, recipe=RecipeConfig(**TINY).for_baseline(name),
                           device="cpu", limit=LIMIT)
        train_bundle(req, echo=lambda _m: None)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def x_y() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset([CIFAR_TEST]).subset(list(range(64)))
    return to_tensor(data.x), torch.from_numpy(data.y).long()


def test_manifest_records_what_each_baseline_deploys(baselines: dict[str, Path]) -> None:
    for name, path in baselines.items():
        raw = read_bundle_manifest(path)
        assert raw["defense"] == DefenseSpec.for_baseline(name).to_dict()
        assert raw["provenance"]["recipe"]["baseline"] == name
        assert set(raw["weights"]) == FILES[name], name
        assert {p.stem for p in path.glob("*.safetensors")} == FILES[name]
    magnet = read_bundle_manifest(baselines["magnet"])
    assert set(magnet["thresholds"]) == {"recon_error", "jsd"}
    assert magnet["config"]["sparsity_k"] == magnet["config"]["latent_dim"]  # no k-sparse step
    recipe = magnet["provenance"]["recipe"]
    assert (recipe["map_pairs"], recipe["map_adv"], recipe["map_cls"], recipe["map_l1"],
            recipe["adv_ratio"]) == (False, 0, 0, 0, 0)
    assert read_bundle_manifest(baselines["distill-only"])["provenance"]["recipe"]["adv_ratio"] == 0


def test_no_defense_and_magnet_deploy_the_undefended_classifier(baselines: dict[str, Path]) -> None:
    for name in ("none", "magnet"):
        b = DefenseBundle.load(baselines[name])
        for k, v in b.classifier.state_dict().items():
            assert torch.equal(v, b.networks["undefended"].state_dict()[k]), (name, k)


def test_adv_only_deploys_the_classifier_it_trained(baselines: dict[str, Path]) -> None:
    b = DefenseBundle.load(baselines["adv-only"])
    _, calib = load_dataset([CIFAR_TRAIN], limit=LIMIT).split(RecipeConfig().calib_fraction)
    assert "skipped" in b.stages["distill"]
    assert clean_accuracy(b.classifier, calib, torch.device("cpu")) == b.stages["adversarial"]["clean_acc_heldout"]


def test_defense_without_reformer_or_detectors_is_the_classifier(baselines: dict[str, Path], x_y) -> None:
    x, _ = x_y
    for name in ("none", "adv-only", "distill-only"):
        b = DefenseBundle.load(baselines[name])
        assert b.calibrated  # vacuously: nothing to calibrate
        with torch.no_grad():
            o = Defense(b)(x)
            assert torch.equal(o.x_hat, x)
            assert torch.equal(o.label, b.classifier(x).argmax(1))
        assert not bool(o.flagged.any())
        assert all(float(v.abs().max()) == 0.0 for v in o.scores().values())


def test_magnet_flags_only_with_its_own_detectors(baselines: dict[str, Path], x_y) -> None:
    x, y = x_y
    b = DefenseBundle.load(baselines["magnet"])
    d = Defense(b)
    assert d.perturbation is None and d.detectors == ("recon_error", "jsd")
    x_noisy = (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    with torch.no_grad():
        o = d(torch.cat([x, x_noisy]))
        assert torch.equal(o.label, b.classifier(o.x_hat).argmax(1))
    assert float(o.p_score.abs().max()) == 0.0
    expected = (o.recon_error > b.thresholds["recon_error"]) | (o.jsd > b.thresholds["jsd"])
    assert torch.equal(o.flagged, expected) and bool(expected[len(x):].any())
    assert set(AdaptiveAttack(d, 0.1).thresholds) == {"recon_error", "jsd"}


def test_old_manifest_without_defense_field_is_the_full_defense(trained_bundle_dir: Path, tmp_path: Path, x_y) -> None:
    old = tmp_path / "old"
    shutil.copytree(trained_bundle_dir, old)
    raw = json.loads((old / "manifest.json").read_text())
    del raw["defense"]
    (old / "manifest.json").write_text(json.dumps(raw))
    a, b = DefenseBundle.load(old), DefenseBundle.load(trained_bundle_dir)
    assert a.defense == DefenseSpec() == b.defense
    with torch.no_grad():
        oa, ob = Defense(a)(x_y[0]), Defense(b)(x_y[0])
    assert torch.equal(oa.flagged, ob.flagged) and torch.equal(oa.logits, ob.logits)


def test_contradicting_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="for_baseline"):
        RecipeConfig(baseline="none")  # adv_ratio 0.5 and distillation contradict "no defense"
    req = TrainRequest(data=[CIFAR_TRAIN], out=tmp_path / "b", recipe=RecipeConfig().for_baseline("magnet"),
                       stages=["perturbation"], device="cpu")
    with pytest.raises(IsmEdgeError, match="not part of baseline 'magnet'"):
        train_bundle(req, echo=lambda _m: None)


def test_baselines_are_evaluated_by_the_same_protocol(baselines: dict[str, Path]) -> None:
    data = load_dataset([CIFAR_TEST])
    cfg = EvalConfig(attacks=("pgd",), eps=(0.3,), threats=("oblivious", "adaptive"), n=20, batch_size=20, pgd_steps=3,
                     adaptive_steps=3, sanity=False)
    magnet = evaluate_bundle(DefenseBundle.load(baselines["magnet"]), data, cfg)
    none = evaluate_bundle(DefenseBundle.load(baselines["none"]), data, cfg)
    assert magnet["name"] == "magnet" and magnet["clean"]["fpr"]["p_score"] is None
    assert none["clean"]["fpr"]["any"] == 0.0
    assert all(c["detection_rate"] == 0.0 for c in none["cells"])
    # Without a defense the oblivious source is the deployed classifier itself: nothing transfers, all is white-box.
    (obl,) = [c for c in none["cells"] if c["threat"] == "oblivious"]
    # (3 PGD steps against a one-epoch classifier leave a few of the 20 images correct.)
    assert obl["accuracy"] == obl["source_accuracy"] <= 0.15
