"""Bad engine directories (docs/architecture.md, "Expected failures"): each is one clear line naming
the file and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ism_edge import DefenseRuntime
from ism_edge._io import sha256_file
from ism_edge.errors import EngineError, EngineMismatchError
from tests.ism_edge.conftest import edit_manifest


def _load_error(directory: Path, **kwargs: object) -> EngineError:
    with pytest.raises(EngineError) as err:
        DefenseRuntime(directory, **kwargs)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return err.value


def _engine(directory: Path, role: str) -> Path:
    return directory / json.loads((directory / "manifest.json").read_text())["engines"][role]["file"]


def _rehash(directory: Path, role: str) -> None:
    raw = json.loads((directory / "manifest.json").read_text())
    raw["engines"][role]["sha256"] = sha256_file(directory / raw["engines"][role]["file"])
    (directory / "manifest.json").write_text(json.dumps(raw))


def test_missing_directory(tmp_path: Path) -> None:
    err = _load_error(tmp_path / "nowhere")
    assert "does not exist" in str(err) and "ism-edge build" in str(err)


def test_directory_without_manifest(engine_copy: Path) -> None:
    (engine_copy / "manifest.json").unlink()
    assert "manifest.json is missing" in str(_load_error(engine_copy))


def test_corrupt_manifest(engine_copy: Path) -> None:
    (engine_copy / "manifest.json").write_text('{"format": "ism-edge-engines", "back')
    assert "not valid JSON" in str(_load_error(engine_copy))


def test_manifest_missing_a_field(engine_copy: Path) -> None:
    raw = json.loads((engine_copy / "manifest.json").read_text())
    del raw["thresholds"]
    (engine_copy / "manifest.json").write_text(json.dumps(raw))
    assert "malformed field" in str(_load_error(engine_copy))


def test_missing_engine_file(engine_copy: Path) -> None:
    path = _engine(engine_copy, "classifier")
    path.unlink()
    err = _load_error(engine_copy)
    assert str(path) in str(err) and "missing" in str(err)


def test_tampered_engine_file(engine_copy: Path) -> None:
    path = _engine(engine_copy, "mapper")
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    assert "does not match the hash" in str(_load_error(engine_copy))


def test_corrupt_model_with_a_matching_hash(engine_copy: Path) -> None:
    """A truncated model whose manifest was rewritten to match: ONNX Runtime refuses it cleanly."""
    path = _engine(engine_copy, "perturbation")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _rehash(engine_copy, "perturbation")
    err = _load_error(engine_copy)
    assert str(path) in str(err) and "cannot be loaded by ONNX Runtime" in str(err)


def test_manifest_shape_disagrees_with_the_graphs(engine_copy: Path) -> None:
    edit_manifest(engine_copy, input_shape=[3, 64, 64])
    err = _load_error(engine_copy)
    assert isinstance(err, EngineMismatchError) and "[N, 3, 64, 64]" in str(err)


def test_manifest_class_count_disagrees_with_the_classifier(engine_copy: Path) -> None:
    edit_manifest(engine_copy, class_names=["a", "b", "c"])
    assert "3 classes" in str(_load_error(engine_copy))


def test_swapped_graphs_are_refused(engine_copy: Path) -> None:
    mapper, classifier = _engine(engine_copy, "mapper"), _engine(engine_copy, "classifier")
    shutil.copy(classifier, mapper)
    _rehash(engine_copy, "mapper")
    err = _load_error(engine_copy)
    assert isinstance(err, EngineMismatchError) and "(mapper) has inputs" in str(err)


def test_engines_from_another_onnxruntime_release_are_refused(engine_copy: Path) -> None:
    raw = json.loads((engine_copy / "manifest.json").read_text())
    edit_manifest(engine_copy, versions={**raw.get("versions", {}), "onnxruntime": "0.9.0"})
    err = _load_error(engine_copy)
    assert isinstance(err, EngineMismatchError) and "0.9.0" in str(err)


def test_missing_temperature(engine_copy: Path) -> None:
    edit_manifest(engine_copy, temperatures={"deploy": 1.0})
    assert "temperatures['detector']" in str(_load_error(engine_copy))


def test_a_good_directory_still_loads_after_the_copies(engine_dir: Path) -> None:
    with DefenseRuntime(engine_dir) as rt:
        assert rt.backend_name == "onnxruntime" and rt.input_shape == (3, 32, 32)
