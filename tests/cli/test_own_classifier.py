"""`ism-edge train --classifier`: protect a user's own classifier, train → build → run.

The classifier (``tests/own_classifier_models.py``) is not ism-edge's architecture: residual
blocks, BatchNorm, global average pooling, a 48×48 input (not a multiple of 16) and ImageNet
mean/std applied outside the graph. It is trained here for a few seconds on CIFAR-10 sample
images of three classes, exported with ``torch.onnx``, and protected as an image folder with a
``--classes`` file whose order is not the folders' sorted order.
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
cv2 = pytest.importorskip("cv2")

from ism_edge_cli.main import app  # noqa: E402
from tests.conftest import CIFAR_TEST, CIFAR_TRAIN  # noqa: E402
from tests.own_classifier_models import IMAGENET_MEAN, IMAGENET_STD, SIZE, TinyResNet  # noqa: E402

runner = CliRunner()
CLASSES = {0: "airplane", 1: "automobile", 7: "horse"}  # CIFAR-10 label → folder name
ORDER = ("horse", "airplane", "automobile")  # the model's output order (--classes file)
PER_CLASS = 40
FAST = ["--epochs-mapper", "2", "--epochs-perturbation", "1", "--batch-size", "32", "--device", "cpu",
        "--guard-examples", "0"]


def _one_error_line(result: Any) -> str:
    """The one ``error:`` line; progress lines the recipe logged before it (``data: …``) may precede it."""
    err = result.stderr.strip().splitlines()
    assert result.exit_code != 0, result.output
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], result.stderr
    assert all(line.startswith(("data: ", "error: ")) for line in err), result.stderr
    assert "Traceback" not in result.output + result.stderr
    return errors[0]


def _images(npz: Path, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` uint8 RGB 48×48 images of each of :data:`CLASSES` and their output indices."""
    with np.load(npz) as z:
        x, y = z["x"], z["y"]
    xs, ys = [], []
    for label, name in CLASSES.items():
        for img in x[y == label][:per_class]:
            xs.append(cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA))
            ys.append(ORDER.index(name))
    return np.stack(xs), np.asarray(ys)


def _normalised(x: np.ndarray) -> Any:
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    return (t - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("own")
    with np.load(CIFAR_TRAIN) as z:
        x, y = z["x"], z["y"]
    for label, name in CLASSES.items():
        folder = root / "data" / name
        folder.mkdir(parents=True)
        for i, img in enumerate(x[y == label][:PER_CLASS]):
            cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    (root / "classes.txt").write_text("\n".join(ORDER) + "\n")
    torch.manual_seed(0)
    xs, ys = _images(CIFAR_TRAIN, PER_CLASS)
    inputs, labels = _normalised(xs), torch.from_numpy(ys)
    model = TinyResNet(classes=3, width=8)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(8):
        for idx in torch.randperm(len(inputs)).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs[idx]), labels[idx]).backward()
            opt.step()
    model.eval()
    # Exported as most users do: a fixed batch of 1, weights in an external .onnx.data file.
    torch.onnx.export(model, (torch.rand(1, 3, SIZE, SIZE),), str(root / "model.onnx"), dynamo=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "weights.safetensors"))
    bundle = root / "bundle"
    r = runner.invoke(app, ["train", "--classifier", str(root / "model.onnx"), "--data", str(root / "data"),
                            "--classes", str(root / "classes.txt"), "--mean", ",".join(map(str, IMAGENET_MEAN)),
                            "--std", ",".join(map(str, IMAGENET_STD)), "--out", str(bundle), *FAST])
    assert r.exit_code == 0, r.output
    engines = root / "engines"
    r = runner.invoke(app, ["build", str(bundle), "--out", str(engines), "--backend", "onnxruntime",
                            "--precision", "fp32", "--parity-samples", "64"])
    assert r.exit_code == 0, r.output
    return {"root": root, "model": model, "bundle": bundle, "engines": engines}


def test_the_bundle_records_the_frozen_classifier_and_its_contract(own: dict[str, Any]) -> None:
    manifest = json.loads((own["bundle"] / "manifest.json").read_text())
    record = manifest["classifier"]
    assert record["origin"]["kind"] == "onnx" and record["origin"]["source"].endswith("model.onnx")
    assert record["input"] == {"height": 48, "width": 48, "layout": "NCHW", "channel_order": "RGB", "scale": 1.0,
                               "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "output": "logits"}
    assert manifest["class_names"] == list(ORDER)
    assert manifest["input"]["height"] == manifest["input"]["width"] == 48
    assert "classifier" not in manifest["weights"] and (own["bundle"] / "classifier.onnx").is_file()
    for stage in ("undefended", "adversarial", "distill", "finetune"):
        assert "frozen" in manifest["stages"][stage]["skipped"]
    assert set(manifest["thresholds"]) == {"recon_error", "jsd", "p_score"}
    engine = json.loads((own["engines"] / "manifest.json").read_text())
    assert engine["input_shape"] == [3, 48, 48] and engine["classifier"]["input"] == record["input"]
    # The compiled graph holds the user's nodes as they are, behind the contract conversion.
    user = onnx.load(str(own["root"] / "model.onnx"))
    compiled = onnx.load(str(own["engines"] / "onnx" / "classifier.onnx"))
    user_ops = [n.op_type for n in user.graph.node]
    ops = [n.op_type for n in compiled.graph.node]
    assert ops[: 3] == ["Sub", "Div", "Identity"] and ops[3: 3 + len(user_ops)] == user_ops


def test_run_labels_clean_frames_as_the_original_model_and_flags_large_attacks(own: dict[str, Any]) -> None:
    from ism_edge.runtime import DefenseRuntime

    model = own["model"]
    xs, _ = _images(CIFAR_TEST, 20)
    with torch.no_grad():
        original = model(_normalised(xs)).argmax(1).numpy()
    frames = own["root"] / "frames"
    frames.mkdir()
    for i, img in enumerate(xs):
        cv2.imwrite(str(frames / f"{i:03d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    log = own["root"] / "run.jsonl"
    r = runner.invoke(app, ["run", str(own["engines"]), str(frames), "--log", str(log), "--headless"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    verdicts = [row for row in rows if "label" in row]
    assert len(verdicts) == len(xs)
    clean = [v for v in verdicts if not v["flagged"]]
    assert len(clean) >= 0.7 * len(xs)
    # An unflagged frame's label is the user's model's own label (label source "auto": C(x)).
    by_file = {f"{i:03d}.png": int(o) for i, o in enumerate(original)}
    assert [ORDER.index(v["label"]) for v in clean] == [by_file[v["file"]] for v in clean]
    # FGSM at ε = 0.2 against the original model: the detectors flag most of it.
    x = (torch.from_numpy(xs).permute(0, 3, 1, 2).float() / 255.0).requires_grad_(True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.nn.functional.cross_entropy(model((x - mean) / std), torch.from_numpy(original)).backward()
    adv = (x + 0.2 * x.grad.sign()).clamp(0, 1).detach()
    attacked = list(np.rint(adv.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8))
    with DefenseRuntime(own["engines"], color_order="RGB") as rt:
        flagged = np.mean([v.flagged for v in rt.process_batch(attacked)])
        clean_flagged = np.mean([v.flagged for v in rt.process_batch(list(xs))])
    assert flagged >= 0.5 and flagged >= clean_flagged + 0.3, (flagged, clean_flagged)


def test_a_pytorch_factory_with_bgr_255_inputs(own: dict[str, Any], tmp_path: Path) -> None:
    from ism_edge_training.bundle import DefenseBundle

    bgr_mean = [255 * m for m in IMAGENET_MEAN[::-1]]
    bgr_std = [255 * s for s in IMAGENET_STD[::-1]]
    out = tmp_path / "bundle"
    r = runner.invoke(app, ["train", "--classifier", "tests.own_classifier_models:factory",
                            "--weights", str(own["root"] / "weights.safetensors"), "--input-size", "48",
                            "--channel-order", "bgr", "--input-scale", "255", "--mean", ",".join(map(str, bgr_mean)),
                            "--std", ",".join(map(str, bgr_std)), "--data", str(own["root"] / "data"),
                            "--classes", str(own["root"] / "classes.txt"), "--out", str(out),
                            "--epochs-mapper", "1", "--epochs-perturbation", "1", "--batch-size", "32", "--limit", "36",
                            "--device", "cpu", "--guard-examples", "0"])
    assert r.exit_code == 0, r.output
    b = DefenseBundle.load(out)
    assert b.classifier_record["origin"]["kind"] == "module"
    assert b.classifier_record["origin"]["source"] == "tests.own_classifier_models:factory"
    assert b.classifier_record["input"]["channel_order"] == "BGR" and b.classifier_record["input"]["scale"] == 255.0
    xs, _ = _images(CIFAR_TEST, 5)
    x = torch.from_numpy(xs).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        ours = b.classifier(x)
        mean = torch.tensor(bgr_mean).view(1, 3, 1, 1)
        std = torch.tensor(bgr_std).view(1, 3, 1, 1)
        # the module sees BGR pixels in [0, 255], normalised by the BGR mean/std
        theirs = own["model"]((x[:, [2, 1, 0]] * 255 - mean) / std)
    assert torch.allclose(ours, theirs, atol=1e-4)


# -- bad input: one error line each, nothing written ------------------------------------------------


def _graph(tmp_path: Path, name: str, nodes: list[Any], in_shape: list[Any], out_shape: list[Any]) -> Path:
    from onnx import TensorProto, helper

    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _pooled(op: str | None) -> list[Any]:
    from onnx import helper

    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["p"]), helper.make_node("Flatten", ["p"], ["f"])]
    nodes.append(helper.make_node(op or "Identity", ["f"], ["output"]))
    return nodes


def _train_error(own: dict[str, Any], tmp_path: Path, classifier: str, *extra: str, data: Path | None = None) -> str:
    out = tmp_path / "b"
    r = runner.invoke(app, ["train", "--classifier", classifier, "--data", str(data or own["root"] / "data"),
                            "--out", str(out), *extra, *FAST])
    line = _one_error_line(r)
    assert not out.exists() and not out.with_name("b.ckpt").exists()
    return line


def test_an_onnx_file_that_does_not_parse(own: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    assert "is not a valid ONNX model" in _train_error(own, tmp_path, str(bad))


def test_an_operator_the_converter_cannot_handle_is_named(own: dict[str, Any], tmp_path: Path) -> None:
    path = _graph(tmp_path, "hardmax", _pooled("Hardmax"), ["N", 3, 48, 48], ["N", 3])
    assert "operator Hardmax" in _train_error(own, tmp_path, str(path))


def test_an_output_that_is_not_n_by_classes(own: dict[str, Any], tmp_path: Path) -> None:
    from onnx import helper

    path = _graph(tmp_path, "image", [helper.make_node("Identity", ["input"], ["output"])], ["N", 3, 48, 48],
                  ["N", 3, 48, 48])
    assert "[N, classes]" in _train_error(own, tmp_path, str(path))


def test_a_dynamic_spatial_size_needs_input_size(own: dict[str, Any], tmp_path: Path) -> None:
    path = _graph(tmp_path, "dynamic", _pooled(None), ["N", 3, "H", "W"], ["N", 3])
    assert "--input-size" in _train_error(own, tmp_path, str(path))


def test_class_count_must_match_the_model(own: dict[str, Any], tmp_path: Path) -> None:
    from onnx import helper, numpy_helper

    nodes = _pooled(None)[:2] + [helper.make_node("MatMul", ["f", "w"], ["output"])]
    from onnx import TensorProto

    g = helper.make_graph(nodes, "four", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 48, 48])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(np.ones((3, 4), np.float32), "w")])
    path = tmp_path / "four.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert "outputs 4" in _train_error(own, tmp_path, str(path))


def test_unreadable_images(own: dict[str, Any], tmp_path: Path) -> None:
    data = tmp_path / "data"
    for name in ORDER:
        (data / name).mkdir(parents=True)
        (data / name / "a.png").write_bytes(b"not a png")
    assert "cannot decode image" in _train_error(own, tmp_path, str(own["root"] / "model.onnx"), data=data)


# -- --finetune adversarial: the recipe's adversarial stage on a copy of the user's classifier -----


def _digests(root: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("model.onnx*"))}


def test_finetune_adversarial_trains_a_copy_that_the_bundle_deploys(own: dict[str, Any], tmp_path: Path) -> None:
    """With --no-distill the adversarially fine-tuned copy itself is deployed."""
    import onnxruntime as ort

    from ism_edge.runtime import DefenseRuntime

    before = _digests(own["root"])
    assert "model.onnx" in before
    out, engines = tmp_path / "bundle", tmp_path / "engines"
    r = runner.invoke(app, ["train", "--classifier", str(own["root"] / "model.onnx"), "--finetune", "adversarial",
                            "--data", str(own["root"] / "data"), "--classes", str(own["root"] / "classes.txt"),
                            "--mean", ",".join(map(str, IMAGENET_MEAN)), "--std", ",".join(map(str, IMAGENET_STD)),
                            "--out", str(out), "--epochs-classifier", "1", "--epochs-mapper", "1",
                            "--epochs-perturbation", "1", "--batch-size", "16", "--limit", "36", "--device", "cpu",
                            "--guard-examples", "0", "--no-distill"])
    assert r.exit_code == 0, r.output
    assert _digests(own["root"]) == before  # the user's files (graph and external weights) are untouched
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["classifier"]
    assert record["origin"]["source"].endswith("model.onnx") and record["origin"]["sha256"] == before["model.onnx"]
    tuned = record["finetuned"]
    assert tuned["method"] == "adversarial" and tuned["epochs"] == 1 and tuned["attack"] == "fgsm-rs"
    assert tuned["eps"] == pytest.approx([8 / 255, 8 / 255])
    assert set(tuned["heldout"]["before"]) == set(tuned["heldout"]["after"]) == {"clean_acc", "pgd_acc"}
    assert tuned["heldout"]["n"] >= 1 and tuned["export_check"]["max_rel_diff"] <= 1e-3
    assert manifest["stages"]["adversarial"]["finetuned"] == tuned and manifest["stages"]["adversarial"]["epochs"] == 1
    assert "skipped" in manifest["stages"]["distill"] and manifest["provenance"]["recipe"]["distill"] is False
    assert "distill" not in tuned
    assert "classifier" not in manifest["weights"] and "teacher" not in manifest["weights"]
    # The bundle's graph is another model than the user's, with the user's input contract (48x48, ImageNet
    # normalisation applied outside the graph): the weights changed.
    xs, _ = _images(CIFAR_TEST, 10)
    user_in = _normalised(xs).numpy()
    theirs = ort.InferenceSession(str(own["root"] / "model.onnx")).run(None, {"x": user_in[:1]})[0]
    session = ort.InferenceSession(str(out / "classifier.onnx"))
    assert session.get_inputs()[0].shape[1:] == [3, 48, 48]
    tuned_logits = session.run(None, {session.get_inputs()[0].name: user_in})[0]
    assert np.abs(tuned_logits[:1] - theirs).max() > 1e-3
    r = runner.invoke(app, ["build", str(out), "--out", str(engines), "--backend", "onnxruntime",
                            "--precision", "fp32", "--parity-samples", "32"])
    assert r.exit_code == 0, r.output
    assert json.loads((engines / "manifest.json").read_text())["classifier"]["finetuned"]["method"] == "adversarial"
    with DefenseRuntime(engines, color_order="RGB") as rt:
        verdicts = rt.process_batch(list(xs))
    clean = [(v, int(i)) for v, i in zip(verdicts, tuned_logits.argmax(1), strict=True) if not v.flagged]
    assert clean  # label source "auto": an unflagged frame's label is the fine-tuned classifier's
    assert [v.label for v, _ in clean] == [ORDER[i] for _, i in clean]


def test_finetune_needs_a_classifier() -> None:
    r = runner.invoke(app, ["train", "--data", "d", "--out", "o", "--finetune", "adversarial"])
    assert r.exit_code == 2 and "--finetune adversarial fine-tunes a --classifier" in _one_error_line(r)


def test_finetune_takes_none_or_adversarial() -> None:
    r = runner.invoke(app, ["train", "--data", "d", "--out", "o", "--classifier", "m.onnx", "--finetune", "bogus"])
    assert r.exit_code == 2 and "Invalid value for '--finetune'" in _one_error_line(r)


def test_finetune_adversarial_of_a_pytorch_factory_trains_a_copy_of_its_module(own: dict[str, Any],
                                                                                tmp_path: Path) -> None:
    """The factory's own module is fine-tuned (not onnx2torch's conversion of its export); the user's
    weights file is untouched and the bundle deploys the exported copy."""
    from ism_edge_training.bundle import DefenseBundle

    weights = own["root"] / "weights.safetensors"
    before = weights.read_bytes()
    out = tmp_path / "bundle"
    r = runner.invoke(app, ["train", "--classifier", "tests.own_classifier_models:factory", "--weights", str(weights),
                            "--input-size", "48", "--finetune", "adversarial", "--data", str(own["root"] / "data"),
                            "--classes", str(own["root"] / "classes.txt"), "--out", str(out),
                            "--epochs-classifier", "1", "--epochs-mapper", "1", "--epochs-perturbation", "1",
                            "--batch-size", "16", "--limit", "36", "--device", "cpu", "--guard-examples", "0"])
    assert r.exit_code == 0, r.output
    assert weights.read_bytes() == before
    b = DefenseBundle.load(out)
    record = b.classifier_record
    assert record["origin"]["kind"] == "module" and record["finetuned"]["method"] == "adversarial"
    assert record["finetuned"]["export_check"]["max_rel_diff"] <= 1e-3
    # distilled by default: the deployed graph is the student's, exported and checked the same way
    assert record["finetuned"]["distill"]["export_check"]["max_rel_diff"] <= 1e-3
    xs, _ = _images(CIFAR_TEST, 5)
    x = torch.from_numpy(xs).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        tuned = b.classifier(x)
        original = own["model"](x)  # no normalisation was declared: the module sees [0, 1] RGB
    assert tuned.shape == original.shape and (tuned - original).abs().max() > 1e-3


def test_finetune_split_over_stages_keeps_the_fine_tuned_copy(own: dict[str, Any], tmp_path: Path) -> None:
    """A later --stages run loads the fine-tuned copy from --out; a run without --finetune is refused on
    that bundle (M and P must never be trained around another classifier than the one deployed)."""
    out = tmp_path / "bundle"
    common = ["train", "--classifier", str(own["root"] / "model.onnx"), "--data", str(own["root"] / "data"),
              "--classes", str(own["root"] / "classes.txt"), "--mean", ",".join(map(str, IMAGENET_MEAN)),
              "--std", ",".join(map(str, IMAGENET_STD)), "--out", str(out), "--epochs-classifier", "1",
              "--epochs-mapper", "1", "--epochs-perturbation", "1", "--batch-size", "16", "--limit", "36",
              "--device", "cpu", "--guard-examples", "0"]
    r = runner.invoke(app, [*common, "--finetune", "adversarial", "--no-distill", "--stages", "adversarial,mapper"])
    assert r.exit_code == 0, r.output
    graph = (out / "classifier.onnx").read_bytes()
    tuned = json.loads((out / "manifest.json").read_text())["classifier"]["finetuned"]
    r = runner.invoke(app, [*common, "--stages", "perturbation,calibrate"])
    assert "fine-tuned copy" in _one_error_line(r)  # one error line, a non-zero exit
    r = runner.invoke(app, [*common, "--finetune", "adversarial", "--stages", "perturbation,calibrate"])
    assert "not yet distilled" in _one_error_line(r)  # the recipe would distil: M and P follow the student
    r = runner.invoke(app, [*common, "--finetune", "adversarial", "--no-distill", "--stages", "perturbation,calibrate"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "classifier.onnx").read_bytes() == graph and manifest["classifier"]["finetuned"] == tuned
    assert set(manifest["thresholds"]) == {"recon_error", "jsd", "p_score"}


# -- --finetune adversarial with distillation: a second copy, distilled from the fine-tuned one, is deployed --


def _finetune_args(own: dict[str, Any], out: Path, *extra: str) -> list[str]:
    return ["train", "--classifier", str(own["root"] / "model.onnx"), "--finetune", "adversarial",
            "--data", str(own["root"] / "data"), "--classes", str(own["root"] / "classes.txt"),
            "--mean", ",".join(map(str, IMAGENET_MEAN)), "--std", ",".join(map(str, IMAGENET_STD)), "--out", str(out),
            "--epochs-classifier", "1", "--epochs-mapper", "1", "--epochs-perturbation", "1", "--batch-size", "16",
            "--device", "cpu", "--guard-examples", "0", *extra]


SMALL = ("--limit", "36")


def _distilled_entry(tuned: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The record's distillation facts, checked: ARD at T = 20 from the teacher, held-out figures of both."""
    d = tuned["distill"]
    assert d["method"] == "ard" and d["epochs"] == epochs and d["temperature"] == 20.0 and d["init"] == "teacher"
    heldout = d["heldout"]
    assert heldout["n"] >= 1 and heldout["eps"] == pytest.approx(8 / 255) and heldout["pgd_steps"] == 10
    for who in ("teacher", "student"):
        assert set(heldout[who]) == {"clean_acc", "pgd_acc"}
        assert all(0.0 <= v <= 1.0 for v in heldout[who].values())
    # the teacher is the fine-tuned copy as exported: its held-out clean accuracy is the copy's
    assert heldout["teacher"]["clean_acc"] == pytest.approx(tuned["heldout"]["after"]["clean_acc"],
                                                             abs=1 / heldout["n"] + 1e-9)
    assert d["export_check"]["max_rel_diff"] <= 1e-3 and d["export_check"]["n"] >= 1
    return d


def test_finetune_adversarial_distils_a_second_copy_that_the_bundle_deploys(own: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    """The recipe's distill stage (ARD) on a copy of the fine-tuned classifier: the student is exported at the
    user's contract, checked and deployed; the teacher is recorded, not saved; build and run agree with the
    student as PyTorch runs it."""
    from ism_edge.runtime import DefenseRuntime
    from ism_edge_training.bundle import DefenseBundle

    before = _digests(own["root"])
    out, engines = tmp_path / "bundle", tmp_path / "engines"
    r = runner.invoke(app, _finetune_args(own, out, "--limit", "60"))
    assert r.exit_code == 0, r.output
    assert _digests(own["root"]) == before
    manifest = json.loads((out / "manifest.json").read_text())
    tuned = manifest["classifier"]["finetuned"]
    assert tuned["method"] == "adversarial" and tuned["export_check"]["max_rel_diff"] <= 1e-3
    distilled = _distilled_entry(tuned, epochs=1)
    stages = manifest["stages"]
    assert stages["adversarial"]["finetuned"] == {k: v for k, v in tuned.items() if k != "distill"}
    assert "skipped" not in stages["distill"] and stages["distill"]["distill"] == distilled
    assert len(stages["distill"]["history"]) == 1
    assert manifest["provenance"]["recipe"]["distill"] is True and manifest["temperatures"]["train"] == 1.0
    # no teacher network: the fine-tuned copy is an architecture of the user's, kept only as its figures
    assert set(manifest["weights"]) == {"mapper", "perturbation", "discriminator"}
    assert sorted(p.name for p in out.iterdir()) == ["classifier.onnx", "discriminator.safetensors", "manifest.json",
                                                     "mapper.safetensors", "perturbation.safetensors"]
    r = runner.invoke(app, ["build", str(out), "--out", str(engines), "--backend", "onnxruntime",
                            "--precision", "fp32", "--parity-samples", "32"])
    assert r.exit_code == 0, r.output
    assert json.loads((engines / "manifest.json").read_text())["classifier"]["finetuned"]["distill"] == distilled
    xs, _ = _images(CIFAR_TEST, 10)
    student = DefenseBundle.load(out).classifier
    with torch.no_grad():
        labels = student(torch.from_numpy(xs).permute(0, 3, 1, 2).float() / 255.0).argmax(1).numpy()
    with DefenseRuntime(engines, color_order="RGB") as rt:
        verdicts = rt.process_batch(list(xs))
    clean = [(v, int(i)) for v, i in zip(verdicts, labels, strict=True) if not v.flagged]
    assert clean  # label source "auto": an unflagged frame's label is the distilled student's
    assert [v.label for v, _ in clean] == [ORDER[i] for _, i in clean]


def test_finetune_distill_split_over_stages_and_not_repeated(own: dict[str, Any], tmp_path: Path) -> None:
    """--stages adversarial, then distill,… in a later run distils the bundle's exported fine-tuned copy; a
    second distill run on the distilled student is refused, and so are stage lists that would train M and P
    around a classifier other than the recipe's."""
    out = tmp_path / "bundle"
    r = runner.invoke(app, _finetune_args(own, out, *SMALL, "--stages", "adversarial,mapper"))
    assert "add distill to --stages" in _one_error_line(r) and not out.exists()
    r = runner.invoke(app, _finetune_args(own, out, *SMALL, "--stages", "adversarial"))
    assert r.exit_code == 0, r.output
    assert "; untrained so far: mapper, perturbation)" in r.output
    teacher_graph = (out / "classifier.onnx").read_bytes()
    tuned = json.loads((out / "manifest.json").read_text())["classifier"]["finetuned"]
    assert "distill" not in tuned
    r = runner.invoke(app, _finetune_args(own, out, *SMALL, "--stages", "mapper"))
    assert "not yet distilled" in _one_error_line(r)
    r = runner.invoke(app, _finetune_args(own, out, *SMALL, "--stages", "distill,mapper"))
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "classifier.onnx").read_bytes() != teacher_graph  # the student replaced the teacher
    assert {k: v for k, v in manifest["classifier"]["finetuned"].items() if k != "distill"} == tuned
    _distilled_entry(manifest["classifier"]["finetuned"], epochs=1)
    assert "epochs" in manifest["stages"]["mapper"] and "teacher" not in manifest["weights"]
    student_graph = (out / "classifier.onnx").read_bytes()
    r = runner.invoke(app, _finetune_args(own, out, *SMALL, "--stages", "distill,mapper"))
    assert "already holds the distilled student" in _one_error_line(r)
    r = runner.invoke(app, _finetune_args(own, out, *SMALL, "--no-distill", "--stages", "calibrate"))
    assert "drop --no-distill" in _one_error_line(r)
    assert (out / "classifier.onnx").read_bytes() == student_graph  # refused runs wrote nothing


def test_finetune_distill_resumes_with_the_students_weights(own: dict[str, Any], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted distill stage continues with --resume from the student of its last epoch, around the
    fine-tuned copy the bundle holds."""
    from ism_edge_training.recipe import runner as runner_mod

    out = tmp_path / "bundle"
    real = runner_mod.classifier_epoch
    calls = {"distill": 0}

    def interrupted(*a: Any, **kw: Any) -> Any:
        if kw.get("teacher") is not None:
            calls["distill"] += 1
            if calls["distill"] == 2:
                raise KeyboardInterrupt
        return real(*a, **kw)

    args = _finetune_args(own, out, *SMALL, "--epochs-distill", "2",
                          "--stages", "adversarial,distill")
    monkeypatch.setattr(runner_mod, "classifier_epoch", interrupted)
    r = runner.invoke(app, args)
    assert r.exit_code == 130, r.output
    assert "distill" not in json.loads((out / "manifest.json").read_text())["classifier"]["finetuned"]
    monkeypatch.setattr(runner_mod, "classifier_epoch", real)
    r = runner.invoke(app, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    assert "distill: resuming at epoch 2/2" in r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    _distilled_entry(manifest["classifier"]["finetuned"], epochs=2)
    assert len(manifest["stages"]["distill"]["history"]) == 2


def test_finetune_refuses_defensive_distillation() -> None:
    """Defensive distillation trains the logits at T: the user's classifier would change its logit scale."""
    r = runner.invoke(app, ["train", "--data", "d", "--out", "o", "--classifier", "m.onnx", "--finetune", "adversarial",
                            "--distill-method", "defensive"])
    assert r.exit_code == 2 and "--distill-method defensive" in _one_error_line(r)


def test_a_manifests_distillation_record_is_checked() -> None:
    """The manifest's ``finetuned.distill`` (what tells a distilled student from the fine-tuned copy) is checked
    like the rest of the classifier record."""
    from ism_edge._checks import FieldError
    from ism_edge.contract import check_classifier_record

    record = {"origin": {"kind": "onnx", "source": "model.onnx", "sha256": "0" * 64},
              "input": {"height": 48, "width": 48, "layout": "NCHW", "channel_order": "RGB", "scale": 1.0,
                        "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "output": "logits"},
              "finetuned": {"method": "adversarial", "epochs": 1, "distill": {"method": "ard", "epochs": 1}}}
    assert check_classifier_record(record) == record
    record["finetuned"]["distill"]["method"] = "defensive"
    with pytest.raises(FieldError, match="finetuned.distill.method"):
        check_classifier_record(record)
    record["finetuned"]["distill"] = "ard"
    with pytest.raises(FieldError, match="finetuned.distill"):
        check_classifier_record(record)
