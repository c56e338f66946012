"""The evaluation protocol on a small trained bundle: schema, sanity properties, adaptive vs oblivious."""

from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ism_edge_training.bundle import DefenseBundle  # noqa: E402
from ism_edge_training.data import load_dataset  # noqa: E402
from ism_edge_training.evaluation import (  # noqa: E402
    EvalConfig,
    csv_text,
    evaluate_bundle,
    markdown_report,
    plan_cells,
    plot_accuracy_vs_eps,
    sanity_checks,
)
from tests.conftest import CIFAR_TEST  # noqa: E402

N = 40
EPS = (8 / 255, 0.3)


@pytest.fixture(scope="module")
def result(trained_bundle_dir: Path) -> dict:
    b = DefenseBundle.load(trained_bundle_dir)
    data = load_dataset([CIFAR_TEST])
    cfg = EvalConfig(eps=EPS, n=N, batch_size=N, pgd_steps=5, adaptive_steps=10)
    return evaluate_bundle(b, data, cfg)


def _cell(result: dict, threat: str, attack: str, eps: float, steps_factor: int = 1) -> dict:
    cells = result["cells"] + result["sanity_cells"]
    (c,) = [c for c in cells if (c["threat"], c["attack"]) == (threat, attack) and abs(c["eps"] - eps) < 1e-9
            and c.get("steps_factor", 1) == steps_factor]
    return c


def _check(result: dict, name: str) -> dict:
    (c,) = [c for c in result["sanity"] if c["name"].startswith(name)]
    return c


def test_schema(result: dict) -> None:
    assert result["n"] == N and result["name"] == "full" and result["dataset"] == "cifar10"
    assert set(result["clean"]) == {"accuracy", "accuracy_other", "classifier_accuracy", "undefended_accuracy", "fpr"}
    assert result["label_source"] == "auto"  # the other label source is reported beside it
    assert set(result["clean"]["fpr"]) == {"recon_error", "jsd", "p_score", "any"}
    assert len(result["cells"]) == 3 * 2 * len(EPS)  # threats × attacks × ε
    for c in result["cells"] + result["sanity_cells"]:
        assert {"threat", "attack", "eps", "source_accuracy", "classifier_accuracy", "accuracy", "accuracy_other",
                "detection_rate", "defended_accuracy", "detected_by", "n", "attack_options"} <= set(c)
        assert c["n"] == N
        assert c["defended_accuracy"] >= max(c["accuracy"], c["detection_rate"]) - 1e-12
        assert c["detection_rate"] >= max(c["detected_by"].values()) - 1e-12
    assert [c["name"] for c in result["sanity"]] == [c["name"] for c in sanity_checks(result)]
    json.dumps(result)


def test_reports(result: dict, tmp_path: Path) -> None:
    md = markdown_report(result)
    assert "| full | known | pgd | 8/255 |" in md and "Sanity checks" in md
    assert "| full | known | pgd | 0.3 |" in md and "89.4 |" in md  # the paper's claim at 0.3, in its own column
    rows = list(csv.DictReader(io.StringIO(csv_text(result))))
    assert len(rows) == len(result["cells"]) + len(result["sanity_cells"])
    assert {r["threat"] for r in rows} == {"oblivious", "known", "adaptive"}
    png = plot_accuracy_vs_eps(result, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_names_the_defense_and_draws_clean_c_alone_chance_and_error_bars(
        result: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_accuracy_vs_eps(result, tmp_path / "plot.png")
    (fig,) = figures
    labels = [t.get_text() for t in fig.legends[0].texts]
    for expected in ("ISM defense: accuracy, PGD", "ISM defense: C alone, PGD", "undefended C: accuracy, PGD",
                     "ISM defense: flagged (ε = 0: false positives), FGSM", "chance (10 %)"):
        assert expected in labels, labels
    top_left = fig.axes[0]
    xs = {x for line in top_left.get_lines() for x in line.get_xdata()}
    assert 0.0 in xs  # the clean point
    assert top_left.collections  # error bars


def test_plan_adds_the_sanity_cells() -> None:
    main, extra = plan_cells(EvalConfig(eps=EPS))
    assert {(c.threat, c.attack, c.eps, c.steps_factor) for c in extra} == {
        *((t, "fgsm", 0.0, 1) for t in ("oblivious", "known", "adaptive")),
        *((t, "pgd", 1.0, 1) for t in ("oblivious", "known", "adaptive")),
        ("known", "pgd", 8 / 255, 2), ("adaptive", "pgd", 8 / 255, 2)}
    assert not plan_cells(EvalConfig(eps=EPS, sanity=False))[1]


def test_adaptive_budgets_apart() -> None:
    cfg = EvalConfig(eps=(0.1, 0.2), adaptive_eps=(8 / 255,), attacks=("pgd",))
    main, extra = plan_cells(cfg)
    assert {(c.threat, c.eps) for c in main} == {("oblivious", 0.1), ("oblivious", 0.2), ("known", 0.1),
                                                 ("known", 0.2), ("adaptive", 8 / 255)}
    # The more-steps check of each threat runs at a budget that threat evaluates.
    assert {(c.threat, c.eps) for c in extra if c.steps_factor == 2} == {("known", 0.1), ("adaptive", 8 / 255)}
    assert cfg.to_dict()["adaptive_eps"] == [8 / 255]
    # Without it the stored options are those of reports written before the option existed.
    assert "adaptive_eps" not in EvalConfig(eps=(0.1,)).to_dict()
    with pytest.raises(ValueError, match="every ε"):
        EvalConfig(adaptive_eps=(2.0,))
    with pytest.raises(ValueError, match="every ε"):
        EvalConfig(adaptive_eps=())


def test_eps_zero_equals_clean(result: dict) -> None:
    for threat in ("oblivious", "known", "adaptive"):
        c = _cell(result, threat, "fgsm", 0.0)
        assert c["accuracy"] == pytest.approx(result["clean"]["accuracy"])
        assert c["detection_rate"] == pytest.approx(result["clean"]["fpr"]["any"])
    assert _check(result, "ε = 0")["passed"] is True


def test_accuracy_falls_as_eps_grows(result: dict) -> None:
    for threat, metric in (("oblivious", "source_accuracy"), ("known", "source_accuracy"),
                           ("adaptive", "defended_accuracy")):
        series = ([_cell(result, threat, "fgsm", 0.0)[metric]]
                  + [_cell(result, threat, "pgd", e)[metric] for e in (*EPS, 1.0)])
        assert all(b <= a + 0.06 for a, b in zip(series, series[1:], strict=False)), (threat, series)
    assert _check(result, "PGD: accuracy falls")["passed"] is True


def test_unbounded_eps_reaches_zero(result: dict) -> None:
    for threat in ("oblivious", "known"):
        assert _cell(result, threat, "pgd", 1.0)["source_accuracy"] <= 0.05
    assert _cell(result, "adaptive", "pgd", 1.0)["accuracy"] <= 0.05
    assert _check(result, "unbounded")["passed"] is True


def test_pgd_at_least_as_strong_as_fgsm(result: dict) -> None:
    for threat in ("oblivious", "known"):
        for e in EPS:
            assert (_cell(result, threat, "pgd", e)["source_accuracy"]
                    <= _cell(result, threat, "fgsm", e)["source_accuracy"] + 0.06)
    assert _check(result, "PGD at least")["passed"] is True


def test_more_steps_never_help_the_defense(result: dict) -> None:
    for threat, metric in (("known", "source_accuracy"), ("adaptive", "defended_accuracy")):
        assert _cell(result, threat, "pgd", 8 / 255, 2)[metric] <= _cell(result, threat, "pgd", 8 / 255)[metric] + 0.06
    assert _check(result, "more steps")["passed"] is True


def test_adaptive_attack_beats_the_oblivious_one_on_the_same_inputs(result: dict) -> None:
    # At ε = 0.3 the detectors flag the oblivious examples; the adaptive attack evades them.
    oblivious = _cell(result, "oblivious", "pgd", 0.3)["defended_accuracy"]
    adaptive = _cell(result, "adaptive", "pgd", 0.3)["defended_accuracy"]
    assert adaptive < oblivious - 0.3
    assert _check(result, "adaptive PGD lowers")["passed"] is True


def test_a_failing_check_is_reported(result: dict) -> None:
    broken = copy.deepcopy(result)
    for c in broken["cells"]:
        if c["attack"] == "pgd" and c["threat"] == "known":
            c["source_accuracy"] = 1.0  # a PGD weaker than FGSM: a broken attack
    checks = {c["name"]: c for c in sanity_checks(broken)}
    assert checks["PGD at least as strong as FGSM"]["passed"] is False
    assert "known" in checks["PGD at least as strong as FGSM"]["detail"]
    broken["sanity"] = list(checks.values())
    assert "**FAIL**" in markdown_report(broken)


def test_square_does_not_beat_white_box(trained_bundle_dir: Path) -> None:
    b = DefenseBundle.load(trained_bundle_dir)
    data = load_dataset([CIFAR_TEST])
    cfg = EvalConfig(attacks=("pgd", "square"), eps=(0.1,), threats=("known",), n=24, batch_size=24, pgd_steps=10,
                     square_queries=100, sanity=False)
    r = evaluate_bundle(b, data, cfg)
    square, pgd = _cell(r, "known", "square", 0.1), _cell(r, "known", "pgd", 0.1)
    assert square["source_accuracy"] < r["clean"]["classifier_accuracy"]  # the black-box attack does something
    assert square["source_accuracy"] >= pgd["source_accuracy"] - 0.1
    assert _check(r, "Square")["passed"] is True
