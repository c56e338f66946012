"""A user's classifier's input contract and any input size, without training (fast).

* an NHWC graph taking BGR pixels in [0, 255] and giving probabilities: the layout is read from
  the graph, and PyTorch (onnx2torch behind :class:`ContractAdapter`) and ONNX Runtime (the
  compiled graph of :func:`classifier_graph`) compute the same logits from the defense's pixels;
* a non-square 40×56 input, not a multiple of 16: M pads to its stride plan and crops back, the
  bundle round-trips, ``ism-edge build`` compiles it and the runtime resizes camera frames to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from ism_edge_training.models.external import ClassifierSource, classifier_graph, prepare_classifier  # noqa: E402


def _save(tmp_path: Path, name: str, nodes: list[Any], inits: list[Any], in_shape: list[Any], k: int) -> Path:
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k])], inits)
    path = tmp_path / f"{name}.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _linear_head(first: str, channels_last: bool, k: int, probabilities: bool) -> tuple[list[Any], list[Any]]:
    """NHWC/NCHW pixels → mean over space → a fixed 3×k matrix (→ softmax)."""
    rng = np.random.default_rng(0)
    axes = [1, 2] if channels_last else [2, 3]
    nodes = [helper.make_node("ReduceMean", [first], ["m"], axes=axes, keepdims=0),
             helper.make_node("MatMul", ["m", "w"], ["z" if probabilities else "logits"])]
    if probabilities:
        nodes.append(helper.make_node("Softmax", ["z"], ["logits"], axis=1))
    return nodes, [numpy_helper.from_array(rng.normal(size=(3, k)).astype(np.float32) / 50, "w")]


def test_nhwc_bgr_255_probabilities_contract(tmp_path: Path) -> None:
    nodes, inits = _linear_head("x", True, 4, True)
    path = _save(tmp_path, "nhwc", nodes, inits, ["batch", 24, 20, 3], 4)
    mean, std = (100.0, 110.0, 120.0), (50.0, 60.0, 70.0)
    src = ClassifierSource(str(path), channel_order="BGR", scale=255.0, mean=mean, std=std, output="probabilities")
    x = np.random.default_rng(1).random((6, 3, 24, 20), dtype=np.float32)
    clf = prepare_classifier(src, x)
    assert clf.contract.layout == "NHWC" and clf.contract.size == (24, 20) and clf.num_classes == 4
    # the user's model on the same image, in its own contract: BGR, [0, 255], normalised, NHWC
    user = ort.InferenceSession(str(path))
    theirs_in = ((x[:, ::-1] * 255 - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(std, (1, 3, 1, 1)))
    p = user.run(None, {"x": theirs_in.transpose(0, 2, 3, 1).astype(np.float32)})[0]
    with torch.no_grad():
        ours = clf(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, np.log(p), atol=1e-5)
    compiled = ort.InferenceSession(classifier_graph(onnx.load(str(path)), clf.contract, 4).SerializeToString())
    assert [i.name for i in compiled.get_inputs()] == ["x"] and [o.name for o in compiled.get_outputs()] == ["logits"]
    np.testing.assert_allclose(compiled.run(None, {"x": x})[0], ours, atol=1e-5)
    # the user's own tensor names ("x", "logits") were renamed away, not clashed with
    assert {"ism_edge.user_input", "ism_edge.user_output"} <= {t for n in onnx.load_from_string(
        classifier_graph(onnx.load(str(path)), clf.contract, 4).SerializeToString()).graph.node for t in n.input}


def test_a_non_square_input_is_padded_for_m_and_compiled(tmp_path: Path) -> None:
    from ism_edge.runtime import DefenseRuntime
    from ism_edge_cli.main import app
    from ism_edge_training.bundle import DefenseBundle, external_networks
    from ism_edge_training.models import preset
    from ism_edge_training.models.padded import PaddedMappingNetwork, mapper_side

    nodes, inits = _linear_head("x", False, 3, False)
    path = _save(tmp_path, "wide", nodes, inits, [1, 3, 40, 56], 3)
    x = np.random.default_rng(2).random((4, 3, 40, 56), dtype=np.float32)
    clf = prepare_classifier(ClassifierSource(str(path)), x)
    assert mapper_side(40, 56) == 64
    cfg = preset("small", num_classes=3, image_size=64)
    nets = external_networks(cfg, clf, (40, 56))
    assert isinstance(nets["mapper"], PaddedMappingNetwork)
    with torch.no_grad():
        assert nets["mapper"](torch.from_numpy(x)).shape == (4, 3, 40, 56)
    b = DefenseBundle(config=cfg, networks=nets, class_names=("a", "b", "c"), classifier_record=clf.record,
                      thresholds={"recon_error": 0.9, "jsd": 0.69, "p_score": 0.999})
    b.save(tmp_path / "bundle")
    loaded = DefenseBundle.load(tmp_path / "bundle")
    assert loaded.input_shape == (3, 40, 56) and isinstance(loaded.mapper, PaddedMappingNetwork)
    with torch.no_grad():
        np.testing.assert_allclose(loaded.classifier(torch.from_numpy(x)).numpy(),
                                   clf(torch.from_numpy(x)).numpy(), atol=1e-6)
    r = CliRunner().invoke(app, ["build", str(tmp_path / "bundle"), "--out", str(tmp_path / "engines"),
                                 "--backend", "onnxruntime", "--precision", "fp32", "--parity-samples", "16"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "engines" / "manifest.json").read_text())
    assert manifest["input_shape"] == [3, 40, 56] and manifest["classifier"]["origin"]["kind"] == "onnx"
    with DefenseRuntime(tmp_path / "engines") as rt:
        v = rt.process(np.zeros((480, 640, 3), np.uint8))
    assert v.label in ("a", "b", "c") and v.frame_size == (480, 640)


def test_a_bundle_whose_classifier_graph_was_modified_is_refused(tmp_path: Path) -> None:
    from ism_edge.errors import BundleError
    from ism_edge_training.bundle import DefenseBundle, external_networks
    from ism_edge_training.models import preset

    nodes, inits = _linear_head("x", False, 3, False)
    path = _save(tmp_path, "c", nodes, inits, ["batch", 3, 32, 32], 3)
    clf = prepare_classifier(ClassifierSource(str(path)), np.random.default_rng(3).random((2, 3, 32, 32),
                                                                                       dtype=np.float32))
    cfg = preset("small", num_classes=3)
    DefenseBundle(config=cfg, networks=external_networks(cfg, clf, (32, 32)), class_names=("a", "b", "c"),
                  classifier_record=clf.record).save(tmp_path / "b")
    with open(tmp_path / "b" / "classifier.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="does not match its hash"):
        DefenseBundle.load(tmp_path / "b")


def test_a_trainable_copy_trains_every_weight_and_exports_at_the_users_contract(tmp_path: Path) -> None:
    """``--finetune``'s copy: the MatMul matrix onnx2torch keeps as a buffer trains, the frozen
    original does not change, and the export takes the user's NHWC BGR [0, 255] input as before."""
    from ism_edge_training.models.external import finetuned_classifier

    nodes, inits = _linear_head("x", True, 4, True)
    path = _save(tmp_path, "nhwc", nodes, inits, ["batch", 24, 20, 3], 4)
    original = path.read_bytes()
    mean, std = (100.0, 110.0, 120.0), (50.0, 60.0, 70.0)
    src = ClassifierSource(str(path), channel_order="BGR", scale=255.0, mean=mean, std=std, output="probabilities")
    x = torch.from_numpy(np.random.default_rng(4).random((6, 3, 24, 20), dtype=np.float32))
    clf = prepare_classifier(src, x.numpy())
    with torch.no_grad():
        frozen_before = clf(x)
    copy = clf.trainable_copy()
    assert [p.shape for p in copy.parameters()] == [(3, 4)]  # the MatMul's weight, a buffer in onnx2torch
    opt = torch.optim.SGD(copy.parameters(), lr=50.0)
    torch.nn.functional.cross_entropy(copy(x), torch.tensor([0, 1, 2, 3, 0, 1])).backward()
    opt.step()
    with torch.no_grad():
        assert torch.equal(clf(x), frozen_before)  # the user's classifier is not the copy
        tuned_out = copy(x)
    assert (tuned_out - frozen_before).abs().max() > 1e-3
    tuned = finetuned_classifier(copy, x.numpy(), {"method": "adversarial", "epochs": 1})
    assert path.read_bytes() == original
    assert tuned.record["origin"] == clf.record["origin"] and tuned.record["input"] == clf.record["input"]
    assert tuned.record["finetuned"]["method"] == "adversarial"
    assert tuned.record["finetuned"]["export_check"]["max_rel_diff"] <= 1e-3
    # the exported graph takes what the user's graph took: NHWC, BGR, [0, 255], normalised
    session = ort.InferenceSession(tuned.graph)
    assert session.get_inputs()[0].shape[1:] == [24, 20, 3]
    theirs_in = ((x.numpy()[:, ::-1] * 255 - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(std, (1, 3, 1, 1)))
    p = session.run(None, {session.get_inputs()[0].name: theirs_in.transpose(0, 2, 3, 1).astype(np.float32)})[0]
    np.testing.assert_allclose(np.log(p), tuned_out.numpy(), atol=1e-4)
    with torch.no_grad():
        np.testing.assert_allclose(tuned(x).numpy(), tuned_out.numpy(), atol=1e-4)


def test_an_export_that_is_not_the_fine_tuned_copy_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundle must hold the model that was fine-tuned: an export that differs from it (here, as if the
    exporter had written the untrained graph) is one BundleError line, and nothing is returned."""
    from ism_edge.errors import BundleError
    from ism_edge_training.models import external

    nodes, inits = _linear_head("x", True, 4, True)
    path = _save(tmp_path, "nhwc", nodes, inits, ["batch", 24, 20, 3], 4)
    src = ClassifierSource(str(path), channel_order="BGR", scale=255.0, output="probabilities")
    x = torch.from_numpy(np.random.default_rng(5).random((6, 3, 24, 20), dtype=np.float32))
    clf = prepare_classifier(src, x.numpy())
    copy = clf.trainable_copy()
    opt = torch.optim.SGD(copy.parameters(), lr=50.0)
    torch.nn.functional.cross_entropy(copy(x), torch.tensor([0, 1, 2, 3, 0, 1])).backward()
    opt.step()
    monkeypatch.setattr(external, "module_to_onnx", lambda *_: clf.graph)
    with pytest.raises(BundleError, match="its ONNX export differs from the trained PyTorch module") as err:
        external.finetuned_classifier(copy, x.numpy(), {"method": "adversarial", "epochs": 1})
    assert "\n" not in str(err.value)


def test_a_copy_with_a_constant_reshape_exports_quietly(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """``nn.Flatten`` in a graph with a dynamic batch is a Reshape to a constant [-1, C]: onnx2torch's
    converter branches on that constant (``if torch.any(shape == 0)``), which torch.export cannot
    trace. The README's example model is one: ``--finetune`` failed on it, after pages of graph on
    stderr. The copy now exports (the TorchScript tracer takes the constant branch) without a word."""
    from ism_edge_training.models.external import finetuned_classifier

    w = np.random.default_rng(6).normal(size=(3, 4)).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
             helper.make_node("Reshape", ["p", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    inits = [numpy_helper.from_array(np.array([-1, 3], dtype=np.int64), "shape"), numpy_helper.from_array(w, "w")]
    path = _save(tmp_path, "flatten", nodes, inits, ["batch", 3, 20, 20], 4)
    x = torch.from_numpy(np.random.default_rng(7).random((6, 3, 20, 20), dtype=np.float32))
    clf = prepare_classifier(ClassifierSource(str(path)), x.numpy())
    copy = clf.trainable_copy()
    torch.optim.SGD(copy.parameters(), lr=50.0).zero_grad()
    capfd.readouterr()
    tuned = finetuned_classifier(copy, x.numpy(), {"method": "adversarial", "epochs": 1})
    out, err = capfd.readouterr()
    assert tuned.record["finetuned"]["export_check"]["max_rel_diff"] <= 1e-3
    with torch.no_grad():
        np.testing.assert_allclose(tuned(x).numpy(), copy(x).numpy(), atol=1e-5)
    assert "GraphModule" not in err + out and "def forward" not in err + out
