"""`ism-edge train` / `evaluate` from the command line: clear errors, outputs written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ism_edge.errors import ExitCode

pytest.importorskip("torch")

from ism_edge_cli.main import app, expand_multi_value  # noqa: E402
from tests.conftest import CIFAR_TEST, CIFAR_TRAIN  # noqa: E402

runner = CliRunner()


def _one_error_line(result) -> str:
    err = result.stderr.strip().splitlines()
    assert result.exit_code != 0
    assert len(err) == 1 and err[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    return err[0]


def test_missing_dataset_is_one_clear_line(tmp_path: Path) -> None:
    r = runner.invoke(app, ["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "b")])
    assert "does not exist" in _one_error_line(r)
    assert not (tmp_path / "b").exists()


def test_malformed_dataset_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 2)))
    r = runner.invoke(app, ["train", "--data", str(bad), "--out", str(tmp_path / "b")])
    assert "bad.npz" in _one_error_line(r)


def test_a_label_outside_the_class_list_is_refused_unless_declared(tmp_path: Path) -> None:
    z = np.load(CIFAR_TEST)
    y = z["y"][:100].copy()
    y[0] = 57
    stray = tmp_path / "stray.npz"
    np.savez(stray, x=z["x"][:100], y=y)
    r = runner.invoke(app, ["train", "--data", str(stray), "--out", str(tmp_path / "b")])
    assert "labels reach 57, so 58 classes" in _one_error_line(r) and "--num-classes 58" in r.stderr
    r = runner.invoke(app, ["train", "--data", str(stray), "--out", str(tmp_path / "b"), "--num-classes", "10"])
    assert "labels reach 57 but 10 classes were declared" in _one_error_line(r)
    assert not (tmp_path / "b").exists()


def test_missing_bundle_for_evaluate(tmp_path: Path) -> None:
    r = runner.invoke(app, ["evaluate", str(tmp_path / "nope"), "--data", str(CIFAR_TEST)])
    assert "ism-edge train" in _one_error_line(r)


def test_bad_eps_is_a_usage_error(tmp_path: Path, trained_bundle_dir: Path) -> None:
    r = runner.invoke(app, ["evaluate", str(trained_bundle_dir), "--data", str(CIFAR_TEST), "--eps", "2"])
    assert r.exit_code == ExitCode.USAGE and "outside [0, 1]" in r.output + r.stderr


def test_evaluate_writes_table_and_json(tmp_path: Path, trained_bundle_dir: Path) -> None:
    out = tmp_path / "eval"
    r = runner.invoke(app, ["evaluate", str(trained_bundle_dir), "--data", str(CIFAR_TEST), "--n", "40",
                            "--eps", "8/255", "--attacks", "fgsm", "--threat", "known", "--no-sanity",
                            "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output + r.stderr
    res = json.loads((out / "results.json").read_text())
    (b,) = res["bundles"]
    assert b["n"] == 40 and len(b["cells"]) == 1 and b["bundle"]["sha256"] and not b["sanity_cells"]
    assert "| full | known | fgsm | 8/255 |" in (out / "results.md").read_text()
    # Not a terminal: no progress bar, but a line per finished cell, and the table at full width.
    assert "evaluate full: batch 1/1 known fgsm ε=0.0314: " in r.stderr and " correct, " in r.stderr
    assert "defe…" not in r.stderr


def test_a_stopped_multi_bundle_evaluation_keeps_the_bundles_it_finished(
        tmp_path: Path, trained_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ism_edge_training.evaluation

    real = ism_edge_training.evaluation.evaluate_bundle
    calls = []

    def second_one_fails(*args, **kwargs):
        calls.append(kwargs.get("name"))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ism_edge_training.evaluation, "evaluate_bundle", second_one_fails)
    copy = tmp_path / "copy"
    shutil.copytree(trained_bundle_dir, copy)
    out = tmp_path / "eval"
    r = runner.invoke(app, ["evaluate", str(trained_bundle_dir), str(copy), "--data", str(CIFAR_TEST), "--n", "6",
                            "--eps", "0.3", "--attacks", "fgsm", "--threat", "known", "--no-sanity", "--out", str(out),
                            "--device", "cpu"])
    assert r.exit_code == ExitCode.INTERRUPTED, r.output + r.stderr
    res = json.loads((out / "results.json").read_text())
    assert [b["name"] for b in res["bundles"]] == [f"full ({trained_bundle_dir.name})"]
    assert res["complete"] is False and res["pending"] == ["full (copy)"]
    assert "(partial: full (copy) not evaluated yet)" in (out / "results.md").read_text()


def test_resume_reuses_the_bundles_an_earlier_run_finished(
        tmp_path: Path, trained_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ism_edge_training.evaluation

    out = tmp_path / "eval"
    opts = ["--data", str(CIFAR_TEST), "--n", "6", "--eps", "0.3", "--attacks", "fgsm", "--threat", "known",
            "--no-sanity", "--out", str(out), "--device", "cpu"]
    r = runner.invoke(app, ["evaluate", str(trained_bundle_dir), *opts])
    assert r.exit_code == 0, r.output + r.stderr
    first = json.loads((out / "results.json").read_text())["bundles"][0]
    copy = tmp_path / "copy"
    shutil.copytree(trained_bundle_dir, copy)
    real = ism_edge_training.evaluation.evaluate_bundle
    calls: list[str] = []

    def counted(*args, **kwargs):
        calls.append(kwargs["name"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ism_edge_training.evaluation, "evaluate_bundle", counted)
    r = runner.invoke(app, ["evaluate", str(trained_bundle_dir), str(copy), *opts, "--resume"])
    assert r.exit_code == 0, r.output + r.stderr
    res = json.loads((out / "results.json").read_text())
    # The copy has the same contents (hash): both bundles reuse the earlier cells, none is evaluated again.
    assert calls == [] and res["complete"] is True and "reused" in r.stderr
    assert [b["cells"] for b in res["bundles"]] == [first["cells"], first["cells"]]
    # Other options (here n) are not the same evaluation: nothing is reused.
    r = runner.invoke(app, ["evaluate", str(trained_bundle_dir), *opts[:3], "5", *opts[4:], "--resume"])
    assert r.exit_code == 0, r.output + r.stderr
    assert len(calls) == 1
    (out / "results.json").write_text("[1, 2]")
    r = runner.invoke(app, ["evaluate", str(trained_bundle_dir), *opts, "--resume"])
    assert "is not an ism-edge evaluate report" in _one_error_line(r)


def test_baseline_option_is_checked(tmp_path: Path) -> None:
    r = runner.invoke(app, ["train", "--data", str(CIFAR_TRAIN), "--out", str(tmp_path / "b"), "--baseline", "nope"])
    assert r.exit_code == ExitCode.USAGE and "'nope' is not one of 'full', 'none', 'magnet'" in r.output + r.stderr
    assert not (tmp_path / "b").exists()


def test_weights_dtype_option_is_checked(tmp_path: Path) -> None:
    r = runner.invoke(app, ["train", "--data", str(CIFAR_TRAIN), "--out", str(tmp_path / "b"),
                            "--weights-dtype", "int8"])
    assert r.exit_code == ExitCode.USAGE and "--weights-dtype must be one of float32, float16" in r.output + r.stderr
    assert not (tmp_path / "b").exists()


def test_train_a_baseline_and_evaluate_it_next_to_the_defense(tmp_path: Path, trained_bundle_dir: Path) -> None:
    none = tmp_path / "none"
    r = runner.invoke(app, ["train", "--data", str(CIFAR_TRAIN), "--out", str(none), "--baseline", "none",
                            "--limit", "200", "--epochs", "1", "--device", "cpu", "--weights-dtype", "float16",
                            "--clf-rank", "16"])
    assert r.exit_code == 0, r.output + r.stderr
    assert "baseline 'none' bundle written" in r.output
    manifest = json.loads((none / "manifest.json").read_text())
    assert manifest["weights_dtype"] == "float16" and manifest["config"]["clf_rank"] == 16
    out = tmp_path / "eval"
    r = runner.invoke(app, ["evaluate", str(trained_bundle_dir), str(none), "--data", str(CIFAR_TEST), "--n", "20",
                            "--eps", "0.3", "--attacks", "fgsm,pgd", "--threat", "oblivious,adaptive",
                            "--pgd-steps", "3", "--adaptive-steps", "3", "--no-sanity", "--out", str(out),
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output + r.stderr
    res = json.loads((out / "results.json").read_text())
    assert [b["name"] for b in res["bundles"]] == ["full", "none"]
    md = (out / "results.md").read_text()
    for row in ("| full | oblivious | pgd | 0.3 |", "| none | adaptive | pgd | 0.3 |"):
        assert row in md
    assert "37.4 |" in md and "89.4 |" in md  # the paper's claims for no defense and the defense at 0.3
    lines = (out / "results.csv").read_text().splitlines()
    assert lines[0].startswith("defense,baseline,dataset,threat") and len(lines) == 1 + 2 * 4
    assert (out / "accuracy_vs_eps.png").read_bytes()[:4] == b"\x89PNG"


def test_crosscheck_without_art_is_one_clear_line(tmp_path: Path, trained_bundle_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ism_edge_training.evaluation.crosscheck.art_version", lambda: None)
    r = runner.invoke(app, ["evaluate", str(trained_bundle_dir), "--data", str(CIFAR_TEST), "--crosscheck",
                            "--out", str(tmp_path / "eval")])
    assert "pip install adversarial-robustness-toolbox" in _one_error_line(r)
    assert not (tmp_path / "eval").exists()


def test_crosscheck_with_art(tmp_path: Path, trained_bundle_dir: Path) -> None:
    pytest.importorskip("art", reason="the ART cross-check needs adversarial-robustness-toolbox")
    out = tmp_path / "eval"
    r = runner.invoke(app, ["evaluate", str(trained_bundle_dir), "--data", str(CIFAR_TEST), "--n", "8",
                            "--eps", "0.1,0.2", "--attacks", "fgsm", "--threat", "known", "--pgd-steps", "3",
                            "--adaptive-steps", "2", "--no-sanity", "--crosscheck", "--crosscheck-n", "6",
                            "--crosscheck-eps", "0.1", "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output + r.stderr
    res = json.loads((out / "results.json").read_text())
    (check,) = res["crosscheck"]
    assert res["bundles"][0]["n"] == 8 and check["n"] == 6 and {row["eps"] for row in check["rows"]} == {0.1}
    # Adversarially robust distillation leaves the student's logits on the teacher's scale (T = 1): no logits/T.
    assert [row["target"] for row in check["rows"]] == ["undefended C", "deployed C",
                                                        "defense label C(M(x)) if flagged, else C(x)"]
    for row in check["rows"]:
        assert {"ours_pgd", "art_pgd", "art_apgd_ce", "art_apgd_dlr"} <= set(row)
    assert "ART PGD %" in (out / "crosscheck.md").read_text()
    assert "cross-check full: undefended C ε=0.1: ours_pgd " in r.stderr


def test_crosscheck_cannot_take_more_images_than_the_evaluation(tmp_path: Path, trained_bundle_dir: Path) -> None:
    r = runner.invoke(app, ["evaluate", str(trained_bundle_dir), "--data", str(CIFAR_TEST), "--n", "8",
                            "--crosscheck-n", "9", "--out", str(tmp_path / "eval")])
    assert r.exit_code == ExitCode.USAGE and "--crosscheck-n must not exceed --n (8)" in r.output + r.stderr
    assert not (tmp_path / "eval").exists()


def test_data_option_takes_several_values(untrained_bundle_dir: Path) -> None:
    assert expand_multi_value(["train", "--data", "p1", "p2", "p3", "--out", "b"]) == [
        "train", "--data", "p1", "--data", "p2", "--data", "p3", "--out", "b"]
    bundle = str(untrained_bundle_dir)  # a bundle after the data paths is the positional BUNDLE
    assert expand_multi_value(["evaluate", "--data", "a.npz", "b.npz", bundle, "--n", "5"]) == [
        "evaluate", "--data", "a.npz", "--data", "b.npz", bundle, "--n", "5"]
    # a value is still a value
    assert expand_multi_value(["evaluate", "--data", bundle]) == ["evaluate", "--data", bundle]
