"""What pip installs for each extra on each target, read from pyproject.toml with pip's own rules
(PEP 508 markers via ``packaging``): nothing from pip where JetPack provides it, and CUDA bindings
of the driver's CUDA major version."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import ROOT

if sys.version_info < (3, 11):
    pytest.skip("tomllib needs Python 3.11", allow_module_level=True)
import tomllib

Requirement = pytest.importorskip("packaging.requirements").Requirement

JETSON = {"platform_machine": "aarch64", "sys_platform": "linux", "platform_system": "Linux"}
X86 = {"platform_machine": "x86_64", "sys_platform": "linux", "platform_system": "Linux"}
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def installed(extra: str | None, target: dict[str, str]) -> dict[str, str]:
    """``{name: specifier}`` that ``pip install 'ism-edge[extra]'`` asks for on ``target``."""
    lines = PROJECT["dependencies"] + (PROJECT["optional-dependencies"][extra] if extra else [])
    out = {}
    for line in lines:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({**target, "extra": extra or ""}):
            out[req.name] = str(req.specifier)
    return out


@pytest.mark.parametrize("extra", [None, "tensorrt", "tensorrt-cu12", "tensorrt-cu13", "onnxruntime", "train", "dev"])
def test_pip_never_installs_what_jetpack_provides_on_a_jetson(extra: str | None) -> None:
    got = installed(extra, JETSON)
    assert not [name for name in got if name.startswith("tensorrt") or name.startswith("opencv")], got


def test_the_tensorrt_extras_pin_cuda_python_to_the_drivers_cuda_major() -> None:
    for extra, pin in (("tensorrt", ">=12.6.1,<13"), ("tensorrt-cu12", ">=12.6.1,<13"), ("tensorrt-cu13", ">=13,<14")):
        for target in (JETSON, X86):
            got = Requirement(f"cuda-python{installed(extra, target)['cuda-python']}")
            assert got.specifier == Requirement(f"cuda-python{pin}").specifier
    assert set(installed("tensorrt-cu12", X86)) >= {"tensorrt-cu12"}
    assert "tensorrt" not in installed("tensorrt-cu12", X86)
    assert "tensorrt-cu13" in installed("tensorrt-cu13", X86)


def test_one_onnxruntime_build_per_install_and_a_torch_range() -> None:
    assert "onnxruntime" not in installed(None, X86) and "onnxruntime-gpu" not in installed(None, X86)
    assert "onnxruntime-gpu" not in installed("train", X86) and "onnxruntime" not in installed("onnxruntime-gpu", X86)
    assert "opencv-python-headless" in installed(None, X86) and "opencv-python-headless" in installed("opencv", JETSON)
    torch = Requirement(f"torch{installed('train', X86)['torch']}").specifier
    assert "2.13.0" in torch and "2.6.0" in torch and not str(torch).startswith("==")
    assert PROJECT["requires-python"] == ">=3.10"  # JetPack 6's Python


def test_the_video_extra_brings_an_h264_encoder_on_every_target() -> None:
    """PyAV, which ism_edge.encoders imports only when an .mp4 is written; never in the base install."""
    for target in (JETSON, X86):
        assert "av" in installed("video", target) and "av" not in installed(None, target)
