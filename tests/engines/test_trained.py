"""Parity of the exported graphs on a trained bundle (the shared `trained_bundle_dir` fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ism_edge.manifest import ROLES, load_manifest

pytest.importorskip("onnx")


@pytest.mark.slow  # the fixture trains a small defense (~1 min on 2 cores) unless another test already did
def test_trained_bundle_builds_with_parity_in_tolerance(trained_bundle_dir: Path, tmp_path: Path) -> None:
    from ism_edge_engines.build import build_engines

    m = load_manifest(build_engines(trained_bundle_dir, tmp_path / "e", parity_samples=128))
    p = m.parity
    assert p["ok"] and p["fp32"]["ok"] and p["engine"]["ok"]
    assert p["fp32"]["defense"]["label_agreement"] >= 0.995 and p["fp32"]["defense"]["flag_agreement"] >= 0.995
    for role in ROLES:  # FP16 graphs: every output within its bound, even where not gated
        for name, o in p["fp16"]["graphs"][role]["outputs"].items():
            assert o["max_abs"] <= o["limit_max_abs"] and o["mean_abs"] <= o["limit_mean_abs"], (role, name, o)
    logits32 = p["fp32"]["graphs"]["classifier"]["outputs"]["logits"]["max_abs"]
    logits16 = p["fp16"]["graphs"]["classifier"]["outputs"]["logits"]["max_abs"]
    assert logits32 < logits16  # FP16 really is a different, lower precision
