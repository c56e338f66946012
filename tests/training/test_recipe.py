"""The training recipe on the committed real CIFAR-10 sample: it learns, calibrates and resumes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ism_edge.errors import BundleError, IsmEdgeError  # noqa: E402
from ism_edge_training.bundle import DefenseBundle  # noqa: E402
from ism_edge_training.data import load_dataset  # noqa: E402
from ism_edge_training.defense import Defense  # noqa: E402
from ism_edge_training.recipe import STAGES, RecipeConfig, TrainRequest, train_bundle  # noqa: E402
from ism_edge_training.recipe import runner as runner_mod  # noqa: E402
from ism_edge_training.recipe.stages import defense_scores  # noqa: E402
from tests.conftest import CIFAR_TEST, CIFAR_TRAIN  # noqa: E402


@pytest.fixture(scope="module")
def heldout():
    return load_dataset([CIFAR_TEST])


def _accuracy(net: torch.nn.Module, data) -> float:
    from ism_edge_training.recipe.runner import clean_accuracy

    return clean_accuracy(net, data, torch.device("cpu"))


def test_short_training_beats_chance(trained_bundle_dir: Path, heldout) -> None:
    b = DefenseBundle.load(trained_bundle_dir)
    assert set(b.stages) == set(STAGES)
    # 10 classes: chance is 10 %; a minute of training on 1,800 real images clearly beats it.
    assert _accuracy(b.networks["undefended"], heldout) > 0.25
    assert _accuracy(b.classifier, heldout) > 0.20


def test_detectors_flag_large_attacks_far_more_than_clean(trained_bundle_dir: Path, heldout) -> None:
    from ism_edge_training.attacks import PGD
    from ism_edge_training.data.torch_utils import to_tensor
    from ism_edge_training.defense import attack_surrogate

    b = DefenseBundle.load(trained_bundle_dir)
    x = to_tensor(heldout.x[:200])
    y = torch.from_numpy(heldout.y[:200])
    x_adv = PGD(attack_surrogate(b), 0.3, steps=5, seed=0)(x, y)
    d = Defense(b)
    with torch.no_grad():
        clean, adv = d(x), d(x_adv)
    assert adv.flagged.float().mean() > clean.flagged.float().mean() + 0.3


def test_calibrated_fpr_is_near_target_on_held_out_clean_data(trained_bundle_dir: Path, heldout) -> None:
    b = DefenseBundle.load(trained_bundle_dir)
    assert b.calibrated and b.target_fpr == 0.01
    s = defense_scores(Defense(b), heldout, torch.device("cpu"))
    for k, thr in b.thresholds.items():
        fpr = float((s[k] > thr).mean())
        # 1,017 held-out test images: a 1 % FPR is ~10 ± 3 false positives; calibration used 200 others.
        assert fpr <= 0.04, (k, fpr)
    assert float(s["flagged"].mean()) <= 0.08


def test_bundle_records_stages_provenance_and_temperatures(trained_bundle_dir: Path) -> None:
    b = DefenseBundle.load(trained_bundle_dir)
    # Adversarially robust distillation: the teacher trains at T = 1, the soft labels are taken at T = 20.
    assert b.temperatures == {"train": 1.0, "deploy": 1.0, "detector": 10.0, "distill": 20.0}
    assert b.label_source == "auto"
    for stage in ("adversarial", "distill"):  # teacher and student: clean and PGD accuracy on held-out images
        guard = b.stages[stage]["guard"]
        assert guard["n"] == 100 and 0.0 <= guard["pgd_acc"] <= guard["clean_acc"] <= 1.0
        assert 1 <= b.stages[stage]["best_epoch"] <= 4
    assert b.provenance["data"]["kind"] == "npz" and b.provenance["n_train"] + b.provenance["n_calibration"] == 2000
    assert b.stages["calibrate"]["n"] == 200
    assert all("wall_s" in b.stages[s] for s in STAGES)


def test_stage_alone_needs_the_earlier_stages(tmp_path: Path) -> None:
    req = TrainRequest(data=[CIFAR_TRAIN], out=tmp_path / "b", recipe=RecipeConfig(epochs_mapper=1), stages=["mapper"],
                       device="cpu")
    with pytest.raises(BundleError, match="earlier stages"):
        train_bundle(req, echo=lambda _m: None)


def test_calibrate_stage_alone_on_an_existing_bundle(trained_bundle_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "b"
    shutil.copytree(trained_bundle_dir, d)
    req = TrainRequest(data=[CIFAR_TRAIN], out=d, recipe=RecipeConfig(target_fpr=0.05), stages=["calibrate"],
                       device="cpu")
    b = train_bundle(req, echo=lambda _m: None)
    before = DefenseBundle.load(trained_bundle_dir)
    assert b.target_fpr == 0.05
    assert all(b.thresholds[k] <= before.thresholds[k] for k in b.thresholds)  # a higher FPR lowers thresholds
    assert torch.equal(b.mapper.state_dict()["fc.weight"], before.mapper.state_dict()["fc.weight"])


def test_a_shipped_bundle_keeps_only_c_m_p_and_a_later_stage_saves_no_stand_ins(
        trained_bundle_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    shipped = tmp_path / "shipped"
    run = subprocess.run([sys.executable, "scripts/ship_bundle.py", str(trained_bundle_dir), str(shipped)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert {p.stem for p in shipped.glob("*.safetensors")} == {"classifier", "mapper", "perturbation"}
    b = DefenseBundle.load(shipped)
    assert b.provenance["shipped_from"]["path"] == str(trained_bundle_dir)
    req = TrainRequest(data=[CIFAR_TRAIN], out=shipped, recipe=RecipeConfig(target_fpr=0.05), stages=["calibrate"],
                       device="cpu")
    train_bundle(req, echo=lambda _m: None)
    # The run filled teacher, discriminator and undefended with untrained stand-ins; none is saved.
    assert {p.stem for p in shipped.glob("*.safetensors")} == {"classifier", "mapper", "perturbation"}
    assert set(DefenseBundle.load(shipped).networks) == {"classifier", "mapper", "perturbation"}
    req = TrainRequest(data=[CIFAR_TRAIN], out=shipped, stages=["distill"], device="cpu")
    with pytest.raises(BundleError, match="'distill' needs a trained teacher.*run the adversarial stage first"):
        train_bundle(req, echo=lambda _m: None)
    run = subprocess.run([sys.executable, "scripts/ship_bundle.py", str(shipped), str(shipped / "inside")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "is " in run.stderr and "or inside it" in run.stderr


def test_factored_classifier_then_the_undefended_stage_added_to_the_shipped_bundle(trained_bundle_dir: Path,
                                                                                    heldout, tmp_path: Path) -> None:
    """scripts/factor_classifier.py factors every classifier of a bundle; ``--stages undefended`` on
    a bundle that exists adds the oblivious attacker's source model to it and keeps everything else."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    def factor(dst: Path, rank: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "scripts/factor_classifier.py", str(trained_bundle_dir), str(dst),
                               "--rank", str(rank)], cwd=ROOT, capture_output=True, text=True, timeout=300)

    factored = tmp_path / "factored"
    run = factor(factored, 64)
    assert run.returncode == 0, run.stderr
    src, b = DefenseBundle.load(trained_bundle_dir), DefenseBundle.load(factored)
    assert b.config.clf_rank == 64 and b.thresholds == src.thresholds
    assert set(b.provenance["factored"]["relative_error"]) == {"classifier", "teacher", "undefended"}
    x = torch.from_numpy(heldout.x[:300]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        agree = (b.eval().classifier(x).argmax(1) == src.eval().classifier(x).argmax(1)).float().mean()
    assert agree > 0.9
    for dst, rank, why in ((factored, 32, "exists"), (tmp_path / "r", 128, "--rank must be in")):
        run = factor(dst, rank)
        assert run.returncode == 1 and why in run.stderr and "Traceback" not in run.stderr

    shipped = tmp_path / "shipped"
    b.deployed_only().save(shipped)
    req = TrainRequest(data=[CIFAR_TRAIN], out=shipped, recipe=RecipeConfig(epochs_classifier=1, adv_ratio=0.0),
                       stages=["undefended"], device="cpu", limit=300)
    train_bundle(req, echo=lambda _m: None)
    after = DefenseBundle.load(shipped)
    assert set(after.networks) == {"classifier", "mapper", "perturbation", "undefended"}
    assert after.config == b.config and after.thresholds == b.thresholds and "undefended" in after.stages
    assert after.provenance["factored"] == b.provenance["factored"]  # still true of the networks
    for name in ("classifier", "mapper", "perturbation"):
        for k, v in b.networks[name].state_dict().items():
            assert torch.equal(after.networks[name].state_dict()[k], v), f"{name}.{k} changed"


def test_a_fresh_run_of_later_stages_saves_no_untrained_network_as_trained(tmp_path: Path) -> None:
    """A fresh ``--stages adversarial`` run trains only the teacher: the undefended classifier (which the
    oblivious threat model attacks) is not saved at all, the deployed C, M and P are saved as stand-ins
    marked untrained, which build, bench and evaluate refuse until later stages train them."""
    from ism_edge_engines.export import load_deployable
    from ism_edge_training.evaluation import EvalConfig, evaluate_bundle

    out = tmp_path / "b"
    base = dict(data=[CIFAR_TRAIN], out=out, device="cpu", limit=300)
    quick = RecipeConfig(epochs_classifier=1, epochs_distill=1, epochs_mapper=1, epochs_perturbation=1,
                         adv_attack="fgsm", guard_examples=20)
    b = train_bundle(TrainRequest(stages=["adversarial"], recipe=quick, **base), echo=lambda _m: None)
    saved = DefenseBundle.load(out)
    assert set(saved.networks) == {"teacher", "classifier", "mapper", "perturbation"}
    assert saved.untrained == b.untrained == ("classifier", "mapper", "perturbation")
    for refuse in (lambda: load_deployable(out), lambda: saved.refuse_untrained(out, "evaluated")):
        with pytest.raises(BundleError, match="holds untrained classifier, mapper, perturbation networks"):
            refuse()
    # Calibrating random M and P would make a bundle that looks deployable: refused before any stage runs.
    with pytest.raises(BundleError, match="'calibrate' needs a trained mapper and perturbation.*mapper stage first"):
        train_bundle(TrainRequest(stages=["distill", "calibrate"], recipe=quick, **base), echo=lambda _m: None)
    assert DefenseBundle.load(out).stages.keys() == {"adversarial"}  # nothing was trained, nothing written
    b = train_bundle(TrainRequest(stages=["distill", "mapper", "finetune", "perturbation", "calibrate"], recipe=quick,
                                  **base), echo=lambda _m: None)
    done = DefenseBundle.load(out)
    assert done.untrained == () and "untrained" not in (out / "manifest.json").read_text()
    assert set(done.networks) == {"teacher", "classifier", "mapper", "perturbation", "discriminator"}
    load_deployable(out)
    with pytest.raises(IsmEdgeError, match="undefended classifier"):  # never a random one in its place
        evaluate_bundle(done, load_dataset([CIFAR_TEST], split="test").subset(np.arange(8)),
                        EvalConfig(n=8, threats=("oblivious",), attacks=("fgsm",), sanity=False))


def test_a_manifest_listing_untrained_networks_it_does_not_hold_is_refused(trained_bundle_dir: Path,
                                                                          tmp_path: Path) -> None:
    import json

    d = tmp_path / "b"
    shutil.copytree(trained_bundle_dir, d)
    raw = json.loads((d / "manifest.json").read_text())
    for value, why in ((["mapper", "nonsense"], "untrained\\[1\\] must be one of"), ("mapper", "must be a list"),
                       (["mapper"], None)):
        raw["untrained"] = value
        (d / "manifest.json").write_text(json.dumps(raw))
        if why is None:
            with pytest.raises(BundleError, match="holds untrained mapper networks"):
                DefenseBundle.load(d).refuse_untrained(d, "compiled")
        else:
            with pytest.raises(BundleError, match=why):
                DefenseBundle.load(d)


def test_clean_rates_measures_the_mapper_of_a_training_checkpoint(trained_bundle_dir: Path, tmp_path: Path) -> None:
    import re
    import subprocess
    import sys

    from tests.conftest import ROOT

    def rates(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "scripts/clean_rates.py", str(trained_bundle_dir), str(CIFAR_TEST),
                               *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)

    def reformed(run: subprocess.CompletedProcess[str]) -> float:
        assert run.returncode == 0, run.stderr
        return float(re.search(r"^all: .*C\(M\(x\)\) ([0-9.]+)%", run.stdout, re.M).group(1))

    ckpt = trained_bundle_dir.with_name(trained_bundle_dir.name + ".ckpt") / "checkpoint.pt"
    assert reformed(rates("--mapper-from", str(ckpt))) == reformed(rates())  # the run's last M is the bundle's
    state = torch.load(ckpt, weights_only=True)
    state["nets"]["mapper"] = {k: torch.zeros_like(v) for k, v in state["nets"]["mapper"].items()}
    torch.save(state, tmp_path / "zeroed.pt")
    assert reformed(rates("--mapper-from", str(tmp_path / "zeroed.pt"))) <= 20.0  # a constant image: one class
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    run = rates("--mapper-from", str(tmp_path / "junk.pt"))
    assert run.returncode == 1 and run.stderr.startswith("error: ") and "Traceback" not in run.stderr


def test_resume_continues_after_an_interruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = RecipeConfig(epochs_classifier=2, batch_size=256, adv_ratio=0.0)
    out = tmp_path / "b"
    calls = {"n": 0}
    real = runner_mod.classifier_epoch

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(runner_mod, "classifier_epoch", flaky)
    req = TrainRequest(data=[CIFAR_TRAIN], out=out, recipe=recipe, stages=["undefended"], device="cpu", limit=600)
    with pytest.raises(KeyboardInterrupt):
        train_bundle(req, echo=lambda _m: None)
    assert not out.exists() and (tmp_path / "b.ckpt" / "checkpoint.pt").is_file()
    messages: list[str] = []
    monkeypatch.setattr(runner_mod, "classifier_epoch", real)
    req = TrainRequest(data=[CIFAR_TRAIN], out=out, recipe=recipe, stages=["undefended"], device="cpu", limit=600,
                       resume=True)
    b = train_bundle(req, echo=messages.append)
    assert any("resuming at epoch 2/2" in m for m in messages)
    assert len(b.stages["undefended"]["history"]) == 2


def test_resume_with_other_options_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "b"
    base = dict(data=[CIFAR_TRAIN], out=out, stages=["undefended"], device="cpu", limit=300)
    train_bundle(TrainRequest(recipe=RecipeConfig(epochs_classifier=1, adv_ratio=0.0), **base), echo=lambda _m: None)
    with pytest.raises(IsmEdgeError, match="another preset or recipe"):
        train_bundle(TrainRequest(recipe=RecipeConfig(epochs_classifier=2, adv_ratio=0.0), resume=True, **base),
                     echo=lambda _m: None)


def test_resume_with_other_stages_is_refused(tmp_path: Path) -> None:
    """A run of --stages undefended cannot be resumed as the full recipe (it would redo stages silently)."""
    out = tmp_path / "b"
    base = dict(data=[CIFAR_TRAIN], out=out, device="cpu", limit=300,
                recipe=RecipeConfig(epochs_classifier=1, adv_ratio=0.0))
    train_bundle(TrainRequest(stages=["undefended"], **base), echo=lambda _m: None)
    with pytest.raises(IsmEdgeError, match="--stages undefended --resume"):
        train_bundle(TrainRequest(stages=list(STAGES), resume=True, **base), echo=lambda _m: None)


def test_same_seed_same_weights(tmp_path: Path) -> None:
    recipe = RecipeConfig(epochs_classifier=1, batch_size=128, adv_ratio=0.5, adv_attack="fgsm")
    outs = []
    for name in ("a", "b"):
        req = TrainRequest(data=[CIFAR_TRAIN], out=tmp_path / name, recipe=recipe, stages=["adversarial"], device="cpu",
                           limit=300)
        outs.append(train_bundle(req, echo=lambda _m: None))
    w = [o.networks["teacher"].state_dict()["head.3.weight"] for o in outs]
    assert torch.allclose(w[0], w[1])
    assert np.isfinite(w[0].numpy()).all()


def test_exact_pixel_pairs_weigh_as_much_as_reencoded_ones_in_p_s_loss() -> None:
    import numpy as np

    from ism_edge_training.data.arrays import ImageArrays
    from ism_edge_training.recipe.stages import EpochContext

    n = 20
    exact = np.arange(n) < 2  # 10 % exact pixels, as in the CIFAR-10 copy
    data = ImageArrays(np.zeros((n, 32, 32, 3), np.uint8), np.zeros(n, np.int64), ("a", "b"), {}, exact)
    ctx = EpochContext(RecipeConfig(), data, torch.device("cpu"), 0, None, "")
    w = ctx.exact_weights(np.arange(n))
    assert w is not None and float(w[exact].sum()) == pytest.approx(float(w[~exact].sum()))
    assert float(w.mean()) == pytest.approx(1.0)
    same = ImageArrays(data.x, data.y, data.class_names, {}, np.ones(n, bool))
    assert EpochContext(RecipeConfig(), same, torch.device("cpu"), 0, None, "").exact_weights(np.arange(n)) is None
