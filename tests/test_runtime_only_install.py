"""The runtime-only install, for real: the wheel in a fresh venv that has its base dependencies and nothing else.

No torch, no onnx, no ONNX Runtime in it (as ``pip install ism-edge`` on a Jetson before an extra):
the runtime imports, ``--version`` works, and every command that needs an extra says which, in one
line, with the bad-input exit code.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from ism_edge.errors import ExitCode
from tests.conftest import ROOT
from tests.test_packaging import build_wheel

BASE = ("numpy", "opencv-python-headless", "typer", "rich")


def _closure(names: tuple[str, ...]) -> set[str]:
    """These distributions and everything they require (markers for this Python; no extras)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = re.split(r"[\s\[<>=!~;]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(req)
    return seen


def _top_level(dist_name: str) -> set[str]:
    files = md.distribution(dist_name).files or []
    return {f.parts[0] for f in files if f.parts and not f.parts[0].endswith((".dist-info", "__pycache__"))
            and f.parts[0] not in ("..", "bin")}


@pytest.mark.slow
def test_the_wheel_alone_runs_the_runtime_and_names_the_extra_for_the_rest(tmp_path: Path,
                                                                           untrained_bundle_dir: Path) -> None:
    wheel = build_wheel(tmp_path)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    with zipfile.ZipFile(wheel) as z:  # what pip puts in site-packages for a pure wheel
        z.extractall(site)
    # The base dependencies, linked from this environment (the registry is not needed for a test).
    deps = site / "_base_deps"
    deps.mkdir()
    for dist in _closure(BASE):
        for top in _top_level(dist):
            src = Path(md.distribution(dist).locate_file(top))
            if src.exists() and not (deps / top).exists():
                (deps / top).symlink_to(src)
    (site / "_base_deps.pth").write_text(str(deps) + "\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(py), *args], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})

    probe = run("-c", "import ism_edge, ism_edge.runtime, ism_edge_cli.main\n"
                      "for m in ('torch', 'onnx', 'onnxruntime', 'training'):\n"
                      "    try:\n        __import__(m)\n    except ImportError:\n        continue\n"
                      "    raise SystemExit(m + ' is importable')\n")
    assert probe.returncode == 0, probe.stdout + probe.stderr
    version = run("-m", "ism_edge_cli", "--version")
    assert version.returncode == 0 and version.stdout.startswith("ism-edge "), version.stderr
    for args, extra in ((["build", str(untrained_bundle_dir), "--out", str(tmp_path / "e")], "train"),
                        (["train", "--data", str(ROOT / "data/samples/cifar10/train.npz"), "--out",
                          str(tmp_path / "b")], "train"),
                        (["evaluate", str(untrained_bundle_dir), "--data", str(ROOT / "data/samples/cifar10/test.npz")],
                         "train")):
        r = run("-m", "ism_edge_cli", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == ExitCode.BAD_INPUT and len(lines) == 1, f"{args[0]}: {r.stderr}"
        assert lines[0].startswith("error: ") and f"ism-edge[{extra}]" in lines[0], lines[0]
    assert not (tmp_path / "e").exists() and not (tmp_path / "b").exists()
    assert sys.prefix != str(env_dir)
