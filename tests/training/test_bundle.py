"""The defense bundle round-trips and refuses corrupt or foreign artifacts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ism_edge.errors import BundleError  # noqa: E402
from ism_edge_training.bundle import DefenseBundle, bundle_hash  # noqa: E402
from ism_edge_training.defense import Defense  # noqa: E402


def test_round_trip_preserves_weights_and_outputs(untrained_bundle_dir: Path, tmp_path: Path) -> None:
    b = DefenseBundle.load(untrained_bundle_dir)
    b.save(tmp_path / "copy")
    b2 = DefenseBundle.load(tmp_path / "copy")
    assert b2.thresholds == b.thresholds and b2.class_names == b.class_names and b2.config == b.config
    for name, net in b.networks.items():
        for (k, v), (k2, v2) in zip(net.state_dict().items(), b2.networks[name].state_dict().items(), strict=True):
            assert k == k2 and torch.equal(v, v2)
    x = torch.rand(4, 3, 32, 32)
    o1, o2 = Defense(b)(x), Defense(b2)(x)
    assert torch.equal(o1.x_hat, o2.x_hat) and torch.equal(o1.flagged, o2.flagged)


def test_every_file_of_a_saved_bundle_has_the_mode_open_would_give(untrained_bundle_dir: Path,
                                                                   tmp_path: Path) -> None:
    """safetensors writes 0600: a bundle shipped or shared must be readable like its manifest."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    DefenseBundle.load(untrained_bundle_dir).save(tmp_path / "copy")
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "copy").iterdir()}
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_float16_weights_halve_the_files_and_load_as_float32(untrained_bundle_dir: Path, tmp_path: Path) -> None:
    b = DefenseBundle.load(untrained_bundle_dir)
    b.weights_dtype = "float16"
    b.save(tmp_path / "half")
    for f in (tmp_path / "half").glob("*.safetensors"):
        assert f.stat().st_size < 0.6 * (untrained_bundle_dir / f.name).stat().st_size
    b2 = DefenseBundle.load(tmp_path / "half")
    assert b2.weights_dtype == "float16"
    for name, net in b.networks.items():
        for (k, v), v2 in zip(net.state_dict().items(), b2.networks[name].state_dict().values(), strict=True):
            assert v2.dtype == v.dtype, k
            if v.is_floating_point():
                assert torch.equal(v2, v.half().float()), k
    b2.save(tmp_path / "again")  # a re-save keeps float16 (e.g. --stages calibrate on a shipped bundle)
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["weights_dtype"] == "float16"


def test_weights_of_another_dtype_than_the_manifest_says_are_refused(untrained_bundle_dir: Path,
                                                                     tmp_path: Path) -> None:
    b = DefenseBundle.load(untrained_bundle_dir)
    b.weights_dtype = "float16"
    b.save(tmp_path / "half")
    mf = tmp_path / "half" / "manifest.json"
    m = json.loads(mf.read_text())
    m["weights_dtype"] = "float32"
    mf.write_text(json.dumps(m))
    with pytest.raises(BundleError,
                       match=r"classifier.safetensors: tensor '.*' is float16, "
                             r"the manifest's weights_dtype says float32"):
        DefenseBundle.load(tmp_path / "half")
    m["weights_dtype"] = "int8"
    mf.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="weights_dtype"):
        DefenseBundle.load(tmp_path / "half")


def test_weights_too_large_for_float16_are_not_saved(untrained_bundle_dir: Path, tmp_path: Path) -> None:
    b = DefenseBundle.load(untrained_bundle_dir)
    b.weights_dtype = "float16"
    with torch.no_grad():
        next(b.mapper.parameters()).view(-1)[0] = 1e6
    with pytest.raises(ValueError, match="float16 cannot hold"):
        b.save(tmp_path / "half")
    assert not (tmp_path / "half").exists()


def test_manifest_records_provenance_and_versions(untrained_bundle_dir: Path) -> None:
    m = json.loads((untrained_bundle_dir / "manifest.json").read_text())
    assert m["format"] == "ism-edge-bundle" and "torch" in m["versions"]
    assert set(m["weights"]) >= {"classifier", "mapper", "perturbation"}
    assert m["input"]["height"] == 32


def test_tampered_weights_are_refused(untrained_bundle_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "b"
    shutil.copytree(untrained_bundle_dir, d)
    raw = bytearray((d / "mapper.safetensors").read_bytes())
    raw[-10] ^= 0xFF
    (d / "mapper.safetensors").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="mapper.safetensors"):
        DefenseBundle.load(d)


@pytest.mark.parametrize("edit", ["version", "json", "missing"])
def test_bad_manifest_is_refused(untrained_bundle_dir: Path, tmp_path: Path, edit: str) -> None:
    d = tmp_path / "b"
    shutil.copytree(untrained_bundle_dir, d)
    mf = d / "manifest.json"
    if edit == "version":
        m = json.loads(mf.read_text())
        m["format_version"] = 99
        mf.write_text(json.dumps(m))
    elif edit == "json":
        mf.write_text("{not json")
    else:
        mf.unlink()
    with pytest.raises(BundleError, match="manifest.json"):
        DefenseBundle.load(d)


def test_missing_bundle_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="ism-edge train"):
        DefenseBundle.load(tmp_path / "nope")


def test_hash_changes_with_weights(untrained_bundle_dir: Path, tmp_path: Path) -> None:
    b = DefenseBundle.load(untrained_bundle_dir)
    b.save(tmp_path / "a")
    with torch.no_grad():
        next(b.mapper.parameters()).add_(1.0)
    b.save(tmp_path / "b")
    assert bundle_hash(tmp_path / "a") != bundle_hash(tmp_path / "b")
