"""What the wheel installs: import names that belong to this project, and nothing imports the folders' own names."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

# The repository keeps its folders (cli/, engines/, training/); the wheel installs them under these names.
INSTALLED = {"ism_edge", "ism_edge_cli", "ism_edge_engines", "ism_edge_training"}
OLD_IMPORT = re.compile(r"^\s*(?:from|import)\s+(?:training|engines|cli)(?:[\s.]|$)", re.M)


def test_no_module_imports_a_folder_by_its_own_name() -> None:
    # An `import training` would load a second copy of every module beside ism_edge_training's
    # (two DefenseBundle classes, two registries): each import must use the installed name.
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    offenders = [f"{path}: {m.group(0).strip()}" for path in tracked.stdout.split()
                 for m in OLD_IMPORT.finditer((ROOT / path).read_text(encoding="utf-8"))]
    assert offenders == []


def build_wheel(tmp_path: Path) -> Path:
    """The project's wheel, built from the committed tree (no build/ or egg-info of the checkout leaks in)."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in tracked:
        if (ROOT / rel).is_file() and not rel.startswith(("models/", "data/", "tests/")):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("ism_edge-*.whl")
    return wheel


@pytest.mark.slow
def test_the_wheel_installs_only_names_of_this_project(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = z.read(info).decode()
    top = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert top == INSTALLED
    assert "ism-edge = ism_edge_cli.main:main" in entry_points
    # Every package of the folders is in it, and the photos bench makes frames from.
    for folder, name in (("cli", "ism_edge_cli"), ("engines", "ism_edge_engines"), ("training", "ism_edge_training")):
        for init in (ROOT / folder).rglob("__init__.py"):
            assert f"{name}/{init.relative_to(ROOT / folder).as_posix()}" in names
    assert any(n.startswith("ism_edge/bench/photos/") and n.endswith(".jpg") for n in names)
