"""The runtime never imports torch (docs/architecture.md, the rooms' table): checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

HEAVY = ("torch", "ism_edge_training", "ism_edge_engines", "training", "engines", "tensorrt", "pycuda",
         "cuda.bindings.runtime", "onnx")

SCRIPT = r"""
import json, sys
import ism_edge
after_import = sorted(m for m in {heavy!r} if m in sys.modules)

import numpy as np
from ism_edge import DefenseRuntime
from ism_edge.outputs import VerdictLog, VideoFileOutput
from ism_edge.camera_loop import run_camera_loop
from ism_edge.sources import FrameReader, open_source
import ism_edge.backends.tensorrt, ism_edge.cuda  # importable without TensorRT or a GPU

with DefenseRuntime({engine_dir!r}) as rt:
    verdict = rt.process(np.zeros((240, 320, 3), np.uint8))
    batch = rt.process_batch([np.full((64, 48, 3), 200, np.uint8)] * 3)
with DefenseRuntime({engine_dir!r}, mode="tile") as rt:
    tiled = rt.process(np.zeros((100, 70, 3), np.uint8))
    summary = run_camera_loop(
        rt, FrameReader(open_source({video!r})), log=VerdictLog({log!r}), sinks=[VideoFileOutput({out!r}, fps=10)]
    )
    from ism_edge.multi_stream import MultiStream
    several = len(list(MultiStream(rt, [{video!r}, {video!r}])))
print(json.dumps({{
    "after_import": after_import,
    "after_run": sorted(m for m in {heavy!r} if m in sys.modules),
    "label": verdict.label,
    "batch": len(batch),
    "tiles": tiled.tiles.rows * tiled.tiles.cols,
    "frames": summary.frames,
    "several": several,
    "error": summary.error,
}}))
"""


def test_import_and_a_full_onnxruntime_run_load_no_torch(engine_dir: Path, sample_video: Path, tmp_path: Path) -> None:
    code = SCRIPT.format(
        heavy=HEAVY, engine_dir=str(engine_dir), video=str(sample_video), log=str(tmp_path / "v.jsonl"),
        out=str(tmp_path / "o.mp4")
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["after_import"] == []
    assert result["after_run"] == [], f"the runtime imported {result['after_run']}"
    assert result["batch"] == 3 and result["tiles"] == 12 and result["frames"] == 12 and result["error"] is None
    assert result["several"] == 24
    assert len((tmp_path / "v.jsonl").read_text().splitlines()) == 12


@pytest.mark.parametrize("source", ["import torch\n", "from torch import nn\n",
                                    "from ism_edge_training.bundle import DefenseBundle\n",
                                    "import ism_edge_engines.build\n"])
def test_ruff_refuses_torch_side_imports_in_the_runtime_package(source: str) -> None:
    """The rule is lint, not only this test suite: `make test` runs ruff, which bans these in ism_edge/."""
    pytest.importorskip("ruff")
    root = ROOT
    args = [sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "TID251", "--stdin-filename"]
    inside = subprocess.run([*args, "ism_edge/probe.py", "-"], input=source, text=True, capture_output=True, cwd=root)
    assert inside.returncode == 1 and "TID251" in inside.stdout, inside.stdout + inside.stderr
    outside = subprocess.run([*args, "training/probe.py", "-"], input=source, text=True, capture_output=True, cwd=root)
    assert outside.returncode == 0, outside.stdout + outside.stderr
