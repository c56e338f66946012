"""`ism-edge export`: checker-clean graphs with a dynamic batch axis, FP16 variants, parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ism_edge.errors import EngineError, ParityError
from ism_edge.manifest import ROLES
from tests.engines._cli import CliRun

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _files(exported: CliRun) -> dict[str, dict[str, Path]]:
    return {p: {r: exported.out / (f"{r}.onnx" if p == "fp32" else f"{r}.fp16.onnx") for r in ROLES}
            for p in ("fp32", "fp16")}


def test_cli_export_writes_graphs_and_report(exported: CliRun) -> None:
    assert exported.exit_code == 0, exported.output
    for files in _files(exported).values():
        assert all(f.is_file() for f in files.values())
    report = json.loads((exported.out / "export.json").read_text())
    assert report["ok"] is True and report["gated"] == ["fp32", "fp16"]
    assert "✓ export mapper to ONNX" in exported.output  # a step with its timing
    assert "parity vs PyTorch" in exported.output


def test_graphs_are_checker_clean_with_dynamic_batch_and_opset_18(exported: CliRun) -> None:
    from ism_edge_engines.export import check_onnx

    for files in _files(exported).values():
        for role, path in files.items():
            model = check_onnx(path, role)  # onnx.checker full check + I/O contract
            assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
            for value in (*model.graph.input, *model.graph.output):
                assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
                assert value.type.tensor_type.shape.dim[0].dim_param == "N"


@pytest.mark.parametrize("n", [1, 3, 17])
def test_graphs_run_in_onnxruntime_at_any_batch(exported: CliRun, cifar_test: tuple[np.ndarray, np.ndarray],
                                                n: int) -> None:
    x = cifar_test[0][:n].transpose(0, 3, 1, 2).astype(np.float32) / 255
    sess = {r: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            for r, p in _files(exported)["fp32"].items()}
    x_hat, recon = sess["mapper"].run(None, {"x": x})
    (logits,) = sess["classifier"].run(None, {"x": x})
    (p,) = sess["perturbation"].run(None, {"x": x, "x_hat": x_hat})
    assert x_hat.shape == x.shape and recon.shape == (n,) and logits.shape == (n, 10) and p.shape == (n,)
    assert 0 <= x_hat.min() and x_hat.max() <= 1 and 0 <= p.min() and p.max() <= 1
    np.testing.assert_allclose(recon, np.abs(x - x_hat).reshape(n, -1).mean(1), atol=1e-6)


def test_mapper_graph_keeps_the_k_sparse_code(exported: CliRun, untrained_bundle_dir: Path) -> None:
    """TopK + scatter survive export; x̂ depends only on the k kept latent entries, like PyTorch."""
    ops = {n.op_type for n in onnx.load(str(_files(exported)["fp32"]["mapper"])).graph.node}
    assert {"TopK", "ScatterElements"} <= ops
    topk = next(n for n in onnx.load(str(_files(exported)["fp32"]["mapper"])).graph.node if n.op_type == "TopK")
    k_init = {t.name: t for t in onnx.load(str(_files(exported)["fp32"]["mapper"])).graph.initializer}[topk.input[1]]
    manifest = json.loads((untrained_bundle_dir / "manifest.json").read_text())
    assert int(onnx.numpy_helper.to_array(k_init).reshape(-1)[0]) == manifest["config"]["sparsity_k"]


def test_fp16_graphs_compute_in_fp16_and_keep_sensitive_ops_fp32(exported: CliRun) -> None:
    from ism_edge_engines.fp16 import precision_summary

    files = _files(exported)
    for role in ROLES:
        s = precision_summary(files["fp16"][role])
        assert {"Conv", "Gemm"} <= set(s["fp16"]), (role, s)
        model = onnx.load(str(files["fp16"][role]))
        inits = {t.name: t.data_type for t in model.graph.initializer}
        weights = [inits[i] for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm")
                   for i in n.input[1:] if i in inits]
        assert weights and set(weights) == {onnx.TensorProto.FLOAT16}
    sensitive = {
        "mapper": {"Sigmoid", "Sub", "Abs", "ReduceMean", "TopK"},
        "classifier": {"Sub", "Div"},
        "perturbation": {"Sub", "ReduceMean", "Sigmoid"},
    }
    for role, ops in sensitive.items():
        s = precision_summary(files["fp16"][role])
        assert ops <= set(s["fp32"]) and not ops & set(s["fp16"]), (role, s)


def test_parity_report_within_tolerance_on_real_samples(exported: CliRun) -> None:
    report = json.loads((exported.out / "export.json").read_text())
    assert "CIFAR-10 test images" in report["samples"]["source"] and report["samples"]["n"] == 64
    fp32, fp16 = report["fp32"], report["fp16"]
    assert fp32["graphs"]["mapper"]["outputs"]["x_hat"]["max_abs"] <= 1e-4
    assert fp32["graphs"]["classifier"]["outputs"]["logits"]["max_abs"] <= 1e-4
    for part in (fp32, fp16):
        assert part["ok"] and part["defense"]["label_agreement"] >= 0.99 and part["defense"]["flag_agreement"] >= 0.99
        for g in part["graphs"].values():
            assert g["ok"] and all(o["max_abs"] <= o["limit_max_abs"] for o in g["outputs"].values())
    assert (fp16["graphs"]["mapper"]["outputs"]["x_hat"]["max_abs"]
            > fp32["graphs"]["mapper"]["outputs"]["x_hat"]["max_abs"])


def test_graph_outside_tolerance_fails_naming_it(exported: CliRun, untrained_bundle_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from ism_edge_engines import parity
    from ism_edge_engines.ort_build import parity_of_files
    from ism_edge_engines.samples import real_samples
    from ism_edge_training.bundle import DefenseBundle

    bundle = DefenseBundle.load(untrained_bundle_dir)
    x, source = real_samples((3, 32, 32), 16)
    reference = parity.reference_outputs(bundle, x)
    defense = parity.torch_defense_outputs(bundle, x)
    monkeypatch.setitem(parity.TOLERANCES, "fp16", parity.Tolerance(max_abs=1e-9, mean_abs=1e-10, agreement=0.99))
    report = parity_of_files(_files(exported)["fp16"], exported.out, "fp16", bundle, x, reference, defense, 16)
    assert report["ok"] is False
    with pytest.raises(ParityError, match=r"FP16 mapper graph mapper\.fp16\.onnx differs from PyTorch on 'x_hat'"):
        parity.raise_on_failure(report, "FP16", source)


def test_the_defense_gate_runs_the_runtime_backend_and_decision_code(
    exported: CliRun, untrained_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate measures what ships: the graph files through the runtime's ONNX Runtime backend
    (feedback rounds included) and ism_edge.decision.decide, not a copy of the chain."""
    import dataclasses

    from ism_edge import decision
    from ism_edge.backends.onnxruntime import OnnxRuntimeBackend
    from ism_edge_engines import parity
    from ism_edge_engines.samples import real_samples
    from ism_edge_training.bundle import DefenseBundle

    bundle = dataclasses.replace(DefenseBundle.load(untrained_bundle_dir), feedback_rounds=2)
    x, _ = real_samples((3, 32, 32), 12)
    ran: dict[str, list[object]] = {"batches": [], "decided": []}
    enqueue, decide = OnnxRuntimeBackend._enqueue_impl, decision.decide

    def spy_enqueue(self: OnnxRuntimeBackend, x: np.ndarray, job: object, *, want_x_hat: bool) -> object:
        ran["batches"].append((len(x), self.feedback_rounds, self.device))
        return enqueue(self, x, job, want_x_hat=want_x_hat)  # type: ignore[arg-type]

    def spy_decide(out: object, manifest: object) -> object:
        ran["decided"].append(manifest)
        return decide(out, manifest)  # type: ignore[arg-type]

    monkeypatch.setattr(OnnxRuntimeBackend, "_enqueue_impl", spy_enqueue)
    monkeypatch.setattr(decision, "decide", spy_decide)
    ours = parity.defense_outputs(_files(exported)["fp32"], exported.out, bundle, x, batch=8)
    assert ran["batches"] == [(8, 2, "cpu"), (4, 2, "cpu")]
    (manifest,) = ran["decided"]
    assert manifest.thresholds == bundle.thresholds and manifest.label_source == bundle.label_source  # type: ignore[attr-defined]
    ref = parity.torch_defense_outputs(bundle, x)
    np.testing.assert_array_equal(ours["label"], ref["label"])
    np.testing.assert_array_equal(ours["flagged"], ref["flagged"])


def test_corrupted_onnx_file_is_refused(exported: CliRun, tmp_path: Path) -> None:
    from ism_edge_engines.export import check_onnx

    bad = tmp_path / "mapper.onnx"
    data = _files(exported)["fp32"]["mapper"].read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match=r"mapper\.onnx is not a valid ONNX model.*ism-edge export"):
        check_onnx(bad, "mapper")
    (tmp_path / "other.onnx").write_bytes(_files(exported)["fp32"]["classifier"].read_bytes())
    with pytest.raises(EngineError, match="the mapper graph must have inputs"):
        check_onnx(tmp_path / "other.onnx", "mapper")


def test_export_refuses_to_replace_a_foreign_directory(untrained_bundle_dir: Path, tmp_path: Path) -> None:
    from tests.engines._cli import invoke

    (tmp_path / "notes.txt").write_text("keep me")
    run = invoke("export", str(untrained_bundle_dir), "--out", str(tmp_path))
    assert run.exit_code != 0 and "is not an ONNX export directory" in run.output
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_real_samples_are_real_pixels_and_split(cifar_test: tuple[np.ndarray, np.ndarray]) -> None:
    from ism_edge_engines.samples import real_samples

    x, source = real_samples((3, 32, 32), 8)
    np.testing.assert_array_equal((x * 255).round().astype(np.uint8), cifar_test[0][:8].transpose(0, 3, 1, 2))
    train, _ = real_samples((3, 32, 32), 8, split="train")
    assert not np.array_equal(train, x)
    big, source = real_samples((1, 64, 64), 12)
    assert big.shape == (12, 1, 64, 64) and big.dtype == np.float32 and 0 <= big.min() and big.max() <= 1
    assert "resized to 64x64" in source and big.std() > 0.05


def test_max_bound_allows_the_agreement_share_of_samples_beyond_it() -> None:
    """FP16 (agreement 99 %): 2 of 200 samples beyond the max bound pass (a top-k near-tie moves
    one sample's x̂), 3 do not; the mean bound still covers every element."""
    from ism_edge_engines import parity

    tol = parity.TOLERANCES["fp16"]
    ref = np.zeros((200, 3, 4, 4), dtype=np.float32)
    ours = ref.copy()
    ours[:2, 0, 0, 0] = 0.5  # far beyond 2e-2 · (1 + scale)
    r = parity.compare_outputs({"x_hat": ours}, {"x_hat": ref}, tol)["x_hat"]
    assert r["ok"] and r["samples_over_max"] == 2 and r["max_abs"] == 0.5
    ours[2, 0, 0, 0] = 0.5
    r = parity.compare_outputs({"x_hat": ours}, {"x_hat": ref}, tol)["x_hat"]
    assert not r["ok"] and r["samples_over_max"] == 3
    ours[:] = 0.01  # every sample within the max bound, but the mean bound (2e-3) is exceeded
    assert not parity.compare_outputs({"x_hat": ours}, {"x_hat": ref}, tol)["x_hat"]["ok"]
