"""Adversarial training and distillation of the recipe: random-start FGSM, the best-epoch guard, ARD."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ism_edge_training.recipe import RecipeConfig, TrainRequest, train_bundle  # noqa: E402
from ism_edge_training.recipe import runner as runner_mod  # noqa: E402
from ism_edge_training.recipe.stages import BestEpoch, _craft  # noqa: E402
from tests.conftest import CIFAR_TRAIN  # noqa: E402

TINY = dict(epochs_classifier=2, batch_size=128, guard_examples=40)


def _train(tmp_path: Path, name: str, stages: list[str], **recipe: object):
    req = TrainRequest(data=[CIFAR_TRAIN], out=tmp_path / name, recipe=RecipeConfig(**{**TINY, **recipe}),
                       stages=stages, device="cpu", limit=300)
    return train_bundle(req, echo=lambda _m: None)


def test_random_start_fgsm_stays_in_the_ball_and_is_not_plain_fgsm() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    x = torch.rand(16, 3, 8, 8)
    y = torch.randint(0, 10, (16,))
    eps = 8 / 255
    cfg = RecipeConfig()
    rs = _craft(model, x, y, "fgsm-rs", eps, cfg)
    plain = _craft(model, x, y, "fgsm", eps, cfg)
    assert float((rs - x).abs().max()) <= eps + 1e-6 and float(rs.min()) >= 0 and float(rs.max()) <= 1
    # Plain FGSM puts every unclipped pixel on the ball's surface; the random start does not.
    inside = ((rs - x).abs() < eps - 1e-4).float().mean()
    assert float(inside) > 0.05
    assert not torch.allclose(rs, plain)


def test_best_epoch_keeps_and_restores_the_best_weights() -> None:
    net = torch.nn.Linear(2, 2)
    best = BestEpoch(net)
    assert best.update(0, 0.3)
    kept = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    assert not best.update(1, 0.1)  # a worse epoch (e.g. catastrophic overfitting) is not kept
    restored = BestEpoch(net)
    restored.load_state_dict(best.state_dict())  # survives a checkpoint round trip
    restored.restore()
    assert torch.equal(net.weight, kept["weight"]) and restored.epoch == 0


def test_guard_restores_the_epoch_with_the_best_heldout_pgd_accuracy(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    robust = iter([0.40, 0.05, 0.05])  # epoch 1 robust, epoch 2 collapses (catastrophic overfitting); final check
    real = runner_mod.heldout_accuracy
    seen: list[dict[str, torch.Tensor]] = []

    def fake(model, data, device, *, eps=0.0, steps=10, batch_size=250):
        clean, _ = real(model, data, device)
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return clean, next(robust)

    monkeypatch.setattr(runner_mod, "heldout_accuracy", fake)
    b = _train(tmp_path, "g", ["adversarial"], distill=False)
    st = b.stages["adversarial"]
    assert st["best_epoch"] == 1
    assert [h["heldout_pgd_acc"] for h in st["history"]] == [0.40, 0.05]
    # The deployed weights are those measured after epoch 1, not the last epoch's.
    assert all(torch.equal(v, seen[0][k]) for k, v in b.classifier.state_dict().items())


def test_ard_student_starts_from_the_teacher_and_keeps_its_logit_scale(tmp_path: Path) -> None:
    b = _train(tmp_path, "ard", ["adversarial", "distill"], epochs_distill=0)
    teacher, student = b.networks["teacher"].state_dict(), b.classifier.state_dict()
    assert all(torch.equal(v, teacher[k]) for k, v in student.items())
    assert b.temperatures["train"] == 1.0  # attacks differentiate the student itself, not logits / T
    assert b.stages["adversarial"]["guard"]["n"] == 30  # 40 asked, 30 held out of 300


def test_defensive_distillation_trains_the_teacher_at_t(tmp_path: Path) -> None:
    b = _train(tmp_path, "dd", ["adversarial", "distill"], epochs_classifier=1, distill_method="defensive",
               distill_init="scratch")
    assert b.temperatures["train"] == 20.0
    teacher, student = b.networks["teacher"].state_dict(), b.classifier.state_dict()
    assert not all(torch.equal(v, teacher[k]) for k, v in student.items())


def test_config_refuses_unknown_methods() -> None:
    for kw in ({"adv_attack": "bim"}, {"distill_method": "x"}, {"lr_schedule": "step"}, {"label_source": "raw"},
               {"guard_examples": -1}, {"epochs_distill": -2}, {"temperature": 0.0}, {"temperature": 1e5},
               {"detector_temperature": 1e-9}):
        with pytest.raises(ValueError):
            RecipeConfig(**kw)
    assert RecipeConfig(baseline="distill-only", adv_ratio=0.0, distill_method="defensive",
                        distill_init="scratch").teacher_temperature == 20.0


def test_baselines_share_the_classifier_stages_of_a_bundle(trained_bundle_dir: Path, tmp_path: Path) -> None:
    from ism_edge.errors import BundleError
    from ism_edge_training.bundle import DefenseBundle
    from tests.conftest import TRAINED_RECIPE

    full = DefenseBundle.load(trained_bundle_dir)
    recipe = RecipeConfig(**TRAINED_RECIPE)
    adv = train_bundle(TrainRequest(data=[CIFAR_TRAIN], out=tmp_path / "adv", recipe=recipe.for_baseline("adv-only"),
                                    device="cpu", init_from=trained_bundle_dir), echo=lambda _m: None)
    # adv-only deploys the very teacher the full defense was distilled from, and its undefended classifier.
    assert all(torch.equal(v, full.networks["teacher"].state_dict()[k]) for k, v in adv.classifier.state_dict().items())
    assert all(torch.equal(v, full.networks["undefended"].state_dict()[k])
               for k, v in adv.networks["undefended"].state_dict().items())
    assert adv.stages["adversarial"]["shared_from"] == str(trained_bundle_dir)
    assert adv.stages["adversarial"]["guard"] == full.stages["adversarial"]["guard"]
    other = RecipeConfig(**{**TRAINED_RECIPE, "epochs_classifier": 3}).for_baseline("none")
    with pytest.raises(BundleError, match="other options .*epochs_classifier"):
        train_bundle(TrainRequest(data=[CIFAR_TRAIN], out=tmp_path / "none", recipe=other, device="cpu",
                                  init_from=trained_bundle_dir), echo=lambda _m: None)
    assert not (tmp_path / "none").exists()


def test_sharing_checks_the_options_the_stage_itself_was_trained_with(trained_bundle_dir: Path,
                                                                     tmp_path: Path) -> None:
    """provenance.recipe is the last run's: a later run of other stages (a new P, say) with other
    options must not make a stage unshareable, nor shareable with options it was not trained with."""
    import json
    import shutil

    from ism_edge.errors import BundleError
    from tests.conftest import TRAINED_RECIPE

    src = tmp_path / "src"
    shutil.copytree(trained_bundle_dir, src)
    raw = json.loads((src / "manifest.json").read_text())
    trained_with = raw["stages"]["adversarial"]["recipe"]
    assert trained_with == RecipeConfig(**TRAINED_RECIPE).to_dict()
    raw["provenance"]["recipe"]["epochs_classifier"] += 2  # as a later run with other options writes it
    (src / "manifest.json").write_text(json.dumps(raw))
    adv = train_bundle(TrainRequest(data=[CIFAR_TRAIN], out=tmp_path / "adv", device="cpu", init_from=src,
                                    recipe=RecipeConfig(**TRAINED_RECIPE).for_baseline("adv-only")),
                       echo=lambda _m: None)
    assert adv.stages["adversarial"]["shared_from"] == str(src) and adv.stages["adversarial"]["recipe"] == trained_with
    later = RecipeConfig(**{**TRAINED_RECIPE, "epochs_classifier": raw["provenance"]["recipe"]["epochs_classifier"]})
    with pytest.raises(BundleError, match="'undefended' stage was trained with other options .*epochs_classifier"):
        train_bundle(TrainRequest(data=[CIFAR_TRAIN], out=tmp_path / "adv2", device="cpu", init_from=src,
                                  recipe=later.for_baseline("adv-only")), echo=lambda _m: None)


def test_a_full_run_shares_the_distilled_classifier_and_trains_a_new_mapper(trained_bundle_dir: Path,
                                                                            tmp_path: Path) -> None:
    from ism_edge_training.bundle import DefenseBundle
    from tests.conftest import TRAINED_RECIPE

    full = DefenseBundle.load(trained_bundle_dir)
    recipe = RecipeConfig(**{**TRAINED_RECIPE, "epochs_mapper": 1})
    b = train_bundle(TrainRequest(data=[CIFAR_TRAIN], out=tmp_path / "m2", recipe=recipe, device="cpu",
                                  stages=["undefended", "adversarial", "distill", "mapper"], limit=256,
                                  model_overrides={"latent_dim": 256, "sparsity_k": 64},
                                  init_from=trained_bundle_dir), echo=lambda _m: None)
    assert all(torch.equal(v, full.classifier.state_dict()[k]) for k, v in b.classifier.state_dict().items())
    assert b.stages["distill"]["shared_from"] == str(trained_bundle_dir)
    assert b.stages["distill"]["shared_classifier_after"] == "finetune"  # the fixture's C was fine-tuned
    assert "acc_clean" in full.stages["finetune"]["history"][0]  # its finetune stage had the clean rows
    assert b.config.latent_dim == 256 and "shared_from" not in b.stages["mapper"]


def test_thresholds_hold_the_rate_within_every_group() -> None:
    from ism_edge_training.recipe.stages import calibrate_thresholds

    rng = np.random.default_rng(0)
    sharp = rng.normal(1.0, 0.1, 200)  # e.g. exact-pixel images: P scores them higher
    smooth = rng.normal(0.0, 0.1, 1800)
    scores = {"p_score": np.concatenate([sharp, smooth])}
    groups = [np.arange(2000) < 200, np.arange(2000) >= 200]
    mixed = calibrate_thresholds(scores, 0.01, ("p_score",))["p_score"]
    grouped = calibrate_thresholds(scores, 0.01, ("p_score",), groups=groups)["p_score"]
    assert float((sharp > mixed).mean()) > 0.05  # the mix's quantile lets the sharp group through
    assert float((sharp > grouped).mean()) <= 0.01 and float((smooth > grouped).mean()) <= 0.01
