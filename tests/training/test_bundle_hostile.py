"""Hostile defense bundles (issue 18): weight files named outside the bundle, values out of range,
configs that would allocate without bound, mismatched tensors. Each is one line naming the field."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ism_edge.errors import ExitCode
from tests.conftest import set_field

torch = pytest.importorskip("torch")

from ism_edge._io import sha256_file  # noqa: E402
from ism_edge.compat import bundle_sha256  # noqa: E402
from ism_edge.errors import BundleError  # noqa: E402
from ism_edge_training.bundle import DefenseBundle  # noqa: E402
from tests.engines._cli import invoke  # noqa: E402


@pytest.fixture
def bundle(untrained_bundle_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(untrained_bundle_dir, dst)
    return dst


def _edit(directory: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    path = directory / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _refused(directory: Path) -> str:
    with pytest.raises(BundleError) as err:
        DefenseBundle.load(directory)
    message = str(err.value)
    assert "\n" not in message and str(directory) in message, message
    return message


def test_a_weight_file_named_outside_the_bundle_is_refused(bundle: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    shutil.copy(bundle / "mapper.safetensors", outside)
    for name in ("../outside.safetensors", str(outside), "sub/../mapper.safetensors"):
        _edit(bundle, lambda m, name=name: m["weights"]["mapper"].update(file=name, sha256=sha256_file(outside)))
        assert "weights.mapper.file must be a plain file name inside the directory" in _refused(bundle)


def test_a_weight_symlink_out_of_the_bundle_is_refused(bundle: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    shutil.move(bundle / "mapper.safetensors", outside)
    (bundle / "mapper.safetensors").symlink_to(outside)
    message = _refused(bundle)
    assert f"{bundle / 'mapper.safetensors'} leads outside {bundle}" in message and "mapper weights" in message


_set = set_field


@pytest.mark.parametrize(("edit", "field"), [
    (_set("thresholds.jsd", math.nan), "thresholds.jsd must be a finite number"),
    (_set("thresholds.extra", 0.5), "thresholds has unknown scores ['extra']"),
    (_set("feedback_rounds", 10**18), "feedback_rounds must be in [0, 100]"),
    (_set("target_fpr", math.inf), "target_fpr must be a finite number in (0, 0.5]"),
    (_set("temperatures.deploy", -1.0), "temperatures.deploy must be a finite number in [0.001, 10000]"),
    (_set("label_source", "raw"), "label_source must be one of auto, reformed"),
    (_set("class_names", ["a", "b"]), "class_names lists 2 names but config.num_classes is 10"),
    (_set("config.clf_dense", 10**7), "config.clf_dense must be in [1, 65536]"),
    (_set("config.image_size", 10**9), "config.image_size must be in [1, 4096]"),
    (_set("config.clf_widths", [8, 8]), "config.clf_widths must list 4 widths"),
    (_set("config.std", [0.2, "x", 0.2]), "config.std[1] must be a number"),
    (_set("config.map_skip", 1), "config.map_skip must be true or false, got 1"),
    (_set("weights.mapper.sha256", 12), "weights.mapper.sha256 must be a SHA-256 digest"),
    (_set("weights.mapper", "mapper.safetensors"), "weights.mapper must be an object"),
])
def test_a_value_out_of_range_is_refused_naming_the_field(bundle: Path, edit: Callable[[dict[str, Any]], None],
                                                          field: str) -> None:
    _edit(bundle, edit)
    assert field in _refused(bundle)


def test_a_config_that_disagrees_with_the_weights_names_the_tensor(bundle: Path) -> None:
    _edit(bundle, _set("config.clf_dense", 256))  # the small preset's classifier has 128
    message = _refused(bundle)
    assert ("classifier.safetensors: tensor 'head.1.weight' has shape [128, 4096], "
            "the config needs [256, 4096]") in message


def test_a_mismatched_tensor_is_named(bundle: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(bundle / "classifier.safetensors"))
    state["head.3.bias"] = torch.zeros(7)
    save_file(state, str(bundle / "classifier.safetensors"))
    _edit(bundle, _set("weights.classifier.sha256", sha256_file(bundle / "classifier.safetensors")))
    assert "tensor 'head.3.bias' has shape [7], the config needs [10]" in _refused(bundle)
    del state["head.3.bias"]
    save_file(state, str(bundle / "classifier.safetensors"))
    _edit(bundle, _set("weights.classifier.sha256", sha256_file(bundle / "classifier.safetensors")))
    assert "has no tensor 'head.3.bias'" in _refused(bundle)


def test_non_finite_weights_are_refused(bundle: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(bundle / "perturbation.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], math.nan)
    save_file(state, str(bundle / "perturbation.safetensors"))
    _edit(bundle, _set("weights.perturbation.sha256", sha256_file(bundle / "perturbation.safetensors")))
    assert f"tensor {name!r} holds NaN or infinite values" in _refused(bundle)


def test_a_deep_nest_is_refused_before_parsing(bundle: Path) -> None:
    text = (bundle / "manifest.json").read_text().rstrip()
    (bundle / "manifest.json").write_text(text[:-1] + ', "x": ' + "{\"a\": " * 100_000 + "1" + "}" * 100_000 + "}")
    assert "refused (it nests objects or lists more than 32 levels deep)" in _refused(bundle)
    with pytest.raises(BundleError, match="nests objects"):
        bundle_sha256(bundle)


def test_the_torch_free_bundle_hash_refuses_a_malformed_weights_entry(bundle: Path) -> None:
    _edit(bundle, _set("weights.mapper", ["mapper.safetensors"]))
    with pytest.raises(BundleError, match="weights.mapper must be an object"):
        bundle_sha256(bundle)


@pytest.mark.parametrize(("edit", "field"), [
    (_set("config.image_size", 10**9), "config.image_size must be in [1, 4096]"),
    (_set("config.clf_dense", 10**7), "config.clf_dense must be in [1, 65536]"),
])
def test_build_of_a_hostile_bundle_is_one_error_line(bundle: Path, tmp_path: Path,
                                                     edit: Callable[[dict[str, Any]], None], field: str) -> None:
    _edit(bundle, edit)
    run = invoke("build", str(bundle), "--out", str(tmp_path / "engines"), "--backend", "onnxruntime")
    errors = [line for line in run.output.splitlines() if line.startswith("error: ")]
    assert run.exit_code == ExitCode.BAD_INPUT, run.output
    assert len(errors) == 1 and field in errors[0] and "Traceback" not in run.output, run.output
    assert not (tmp_path / "engines").exists()
