"""The evaluation protocol's sanity properties on a small trained bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tests.conftest import CIFAR_TEST  # noqa: E402
from training.bundle import DefenseBundle  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.evaluation import EvalConfig, evaluate_bundle, markdown_table  # noqa: E402


@pytest.fixture(scope="module")
def result(trained_bundle_dir: Path) -> dict:
    b = DefenseBundle.load(trained_bundle_dir)
    data = load_dataset([CIFAR_TEST])
    cfg = EvalConfig(eps=(0.0, 8 / 255, 0.3), n=150, pgd_steps=5)
    return evaluate_bundle(b, data, cfg)


def _cell(result: dict, threat: str, attack: str, eps: float) -> dict:
    (c,) = [c for c in result["cells"] if (c["threat"], c["attack"]) == (threat, attack) and abs(c["eps"] - eps) < 1e-9]
    return c


def test_schema(result: dict) -> None:
    assert result["n"] == 150
    assert set(result["clean"]) == {"accuracy", "classifier_accuracy", "undefended_accuracy", "fpr"}
    assert set(result["clean"]["fpr"]) == {"recon_error", "jsd", "p_score", "any"}
    assert len(result["cells"]) == 2 * 2 * 3
    for c in result["cells"]:
        assert {"threat", "attack", "eps", "source_accuracy", "classifier_accuracy", "accuracy",
                "detection_rate", "defended_accuracy", "n"} <= set(c)
        assert c["defended_accuracy"] >= max(c["accuracy"], c["detection_rate"]) - 1e-12
    json.dumps(result)
    assert "| known | pgd | 8/255 |" in markdown_table(result)


def test_eps_zero_equals_clean(result: dict) -> None:
    for threat in ("oblivious", "known"):
        for attack in ("fgsm", "pgd"):
            c = _cell(result, threat, attack, 0.0)
            assert c["accuracy"] == pytest.approx(result["clean"]["accuracy"])
            assert c["detection_rate"] == pytest.approx(result["clean"]["fpr"]["any"])


def test_pgd_at_least_as_strong_as_fgsm_on_the_attacked_model(result: dict) -> None:
    for threat in ("oblivious", "known"):
        assert _cell(result, threat, "pgd", 8 / 255)["source_accuracy"] <= _cell(result, threat, "fgsm", 8 / 255)["source_accuracy"] + 0.02


def test_attacks_hurt_the_attacked_model(result: dict) -> None:
    assert _cell(result, "known", "pgd", 8 / 255)["classifier_accuracy"] < result["clean"]["classifier_accuracy"] - 0.05
    assert _cell(result, "oblivious", "pgd", 8 / 255)["source_accuracy"] < result["clean"]["undefended_accuracy"] - 0.1


def test_large_perturbations_are_detected(result: dict) -> None:
    assert _cell(result, "known", "pgd", 0.3)["detection_rate"] > 0.8
