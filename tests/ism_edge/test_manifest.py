"""Hostile engine manifests (issue 18): files named outside the directory, values out of range,
oversized and over-nested JSON. Each is refused with one line naming the file and the field."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ism_edge import DefenseRuntime
from ism_edge._io import sha256_file
from ism_edge.errors import EngineError
from ism_edge.manifest import load_manifest
from tests.conftest import set_field


def _edit(directory: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    path = directory / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _refused(directory: Path, *, verify_files: bool = True) -> str:
    with pytest.raises(EngineError) as err:
        load_manifest(directory, verify_files=verify_files)
    message = str(err.value)
    assert "\n" not in message and str(directory / "manifest.json") in message, message
    return message


@pytest.fixture
def outside(engine_copy: Path, tmp_path: Path) -> Path:
    """A copy of the mapper model outside the engine directory (same bytes, so the hash matches)."""
    path = tmp_path / "outside.onnx"
    shutil.copy(engine_copy / "mapper.onnx", path)
    return path


@pytest.mark.parametrize("verify_files", [True, False])
def test_a_file_named_outside_the_directory_is_refused(engine_copy: Path, outside: Path, verify_files: bool) -> None:
    digest = sha256_file(outside)
    for name in ("../outside.onnx", str(outside), "./mapper.onnx", "onnx//mapper.onnx", "onnx\\mapper.onnx"):
        _edit(engine_copy, lambda m, name=name: m["engines"]["mapper"].update(file=name, sha256=digest))
        assert "engines.mapper.file must be a plain file name inside the directory" in _refused(
            engine_copy, verify_files=verify_files)
    _edit(engine_copy, lambda m: m["engines"]["mapper"].update(file="mapper.onnx", onnx="../outside.onnx"))
    assert "engines.mapper.onnx must be a plain file name" in _refused(engine_copy, verify_files=verify_files)


def test_a_symlink_out_of_the_directory_is_refused(engine_copy: Path, outside: Path) -> None:
    (engine_copy / "mapper.onnx").unlink()
    (engine_copy / "mapper.onnx").symlink_to(outside)
    message = _refused(engine_copy, verify_files=False)
    assert f"{engine_copy / 'mapper.onnx'} leads outside {engine_copy}" in message and "(mapper)" in message
    with pytest.raises(EngineError, match="leads outside"):
        DefenseRuntime(engine_copy, verify=False)


def test_a_symlinked_source_folder_out_of_the_directory_is_refused(engine_copy: Path, tmp_path: Path) -> None:
    shutil.move(engine_copy / "onnx", tmp_path / "elsewhere")
    (engine_copy / "onnx").symlink_to(tmp_path / "elsewhere")
    assert "leads outside" in _refused(engine_copy)


def test_a_symlink_inside_the_directory_is_allowed(engine_copy: Path) -> None:
    shutil.move(engine_copy / "mapper.onnx", engine_copy / "onnx" / "mapper.optimized.onnx")
    (engine_copy / "mapper.onnx").symlink_to(engine_copy / "onnx" / "mapper.optimized.onnx")
    assert load_manifest(engine_copy).engines["mapper"].file == "mapper.onnx"


def test_a_recorded_source_outside_the_directory_is_refused(engine_copy: Path) -> None:
    _edit(engine_copy, lambda m: m["parity"]["sources"].update({"../../etc/passwd": "0" * 64}))
    assert "parity.sources key '../../etc/passwd' must be a plain file name" in _refused(engine_copy)


_set = set_field


@pytest.mark.parametrize(("edit", "field"), [
    (_set("thresholds.jsd", math.nan), "thresholds.jsd must be a finite number"),
    (_set("thresholds.recon_error", -1.0), "thresholds.recon_error must be a finite number in [0, "),
    (_set("thresholds.p_score", "0.5"), "thresholds.p_score must be a number"),
    (_set("feedback_rounds", 10**18), "feedback_rounds must be in [0, 100]"),
    (_set("feedback_rounds", 2.5), "feedback_rounds must be a whole number"),
    (_set("batch", {"min": 8, "opt": 8, "max": 1}), "batch must have min <= opt <= max"),
    (_set("batch", {"min": 1, "opt": -1, "max": 8}), "batch.opt must be in [1, 4096]"),
    (_set("batch", {"min": 1, "opt": 8}), "batch must have exactly min, opt and max"),
    (_set("batch.max", 10**9), "batch.max must be in [1, 4096]"),
    (_set("temperatures.detector", 0.0), "temperatures.detector must be a finite number in [0.001, 10000]"),
    (_set("temperatures.deploy", math.inf), "temperatures.deploy must be a finite number"),
    (_set("target_fpr", 0.0), "target_fpr must be a finite number in (0, 0.5]"),
    (_set("input_shape", [3, 10**9, 32]), "input_shape[1] must be in [1, 4096]"),
    (_set("input_shape", [3, 32]), "input_shape must be [C, H, W]"),
    (_set("class_names", ["cat", 7]), "class_names[1] must be a string"),
    (_set("class_names", ["cat", "dog\nerror: fake"]), "class_names[1] contains control characters"),
    (_set("color_order", "XYZ"), "color_order must be one of RGB, BGR"),
    (_set("bundle_sha256", "../x"), "bundle_sha256 must be a SHA-256 digest"),
    (_set("engines.mapper.sha256", None), "engines.mapper.sha256 must be a SHA-256 digest"),
    (_set("engines.mapper.inputs", "x"), "engines.mapper.inputs must be a list"),
    (_set("engines.classifier.outputs", [{"name": "probs", "shape": [-1, 10]}]),
     "engines.classifier.outputs must name ['logits'], got ['probs']"),
    (_set("engines.extra", {}), "engines.extra"),
    (_set("gpu", {"name": 1}), "gpu.name must be a string"),
    (_set("versions", ["1.0"]), "versions must be an object"),
    (_set("calibration", {"frames": 20, "source": "cam", "target_fpr": 0.1, "mode": "tile", "tile_grid": "abc"}),
     "calibration.tile_grid must be a list"),
    (_set("calibration", {"frames": -1, "source": "cam", "target_fpr": 0.1, "mode": "tile"}),
     "calibration.frames must be in"),
])
def test_a_value_out_of_range_is_refused_naming_the_field(engine_copy: Path, edit: Callable[[dict[str, Any]], None],
                                                          field: str) -> None:
    _edit(engine_copy, edit)
    message = _refused(engine_copy, verify_files=False)
    assert field in message and "ism-edge build" in message, message


def test_a_deep_nest_is_refused_before_parsing(engine_copy: Path) -> None:
    text = (engine_copy / "manifest.json").read_text()
    depth = 100_000
    (engine_copy / "manifest.json").write_text(text[:-2] + ', "x": ' + "[" * depth + "]" * depth + "}")
    assert "refused (it nests objects or lists more than 32 levels deep)" in _refused(engine_copy)


def test_brackets_inside_strings_do_not_count_as_nesting(engine_copy: Path) -> None:
    _edit(engine_copy, _set("bundle_name", "[[[[{{{{" * 10 + '"'))
    assert load_manifest(engine_copy).bundle_name.startswith("[[[[{{{{")


def test_an_oversized_manifest_is_refused(engine_copy: Path) -> None:
    _edit(engine_copy, _set("created", "x" * (5 << 20)))
    assert "refused (it is larger than 4 MiB)" in _refused(engine_copy)


def test_the_built_manifest_passes_every_check(engine_dir: Path) -> None:
    manifest = load_manifest(engine_dir)
    assert set(manifest.files()) >= {"mapper.onnx", "onnx/mapper.onnx"}
