"""Type-check TensorRT code with mypy against ``tensorrt-stubs`` that mypy can actually read.

``tensorrt-stubs`` (10.8 to 10.13 on PyPI) installs ``tensorrt/__init__.pyi`` without a
``py.typed`` marker, so plain ``mypy`` skips it and types every ``tensorrt`` name as ``Any``: the
check passes whatever the code calls. Asked to follow the stubs, mypy then stops on syntax errors
in them (stubgen output with parameters named ``in``, a non-default parameter after defaults, a
module attribute ``bool`` shadowing the builtin). This module copies the installed stubs to a
temporary directory, repairs exactly those defects, and runs mypy with that directory first on
its search path; errors inside the stubs themselves are ignored, errors in the checked code are
reported.

Usage: ``python -m ism_edge_engines.typecheck engines/tensorrt_build.py [more paths]``.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from ism_edge.errors import missing_dependency

_HEADER = "import builtins\nimport typing\nimport typing_extensions\nfrom typing import Any as capsule\n"
_BOOL = re.compile(r"(->\s*|:\s*|\[|,\s*|\|\s*)bool\b")
_IN_PARAM = re.compile(r"([(,]\s*)in: ")
_CONFIG = """[mypy]
python_version = 3.11
ignore_missing_imports = True
warn_unused_ignores = False

[mypy-tensorrt_bindings.*]
ignore_errors = True

[mypy-tensorrt.*]
ignore_errors = True
"""


def installed_stub_dir() -> Path:
    """The site-packages folder that holds the installed ``tensorrt-stubs`` files."""
    import importlib.util

    spec = importlib.util.find_spec("tensorrt_stubs")
    if spec is None or spec.origin is None:
        raise missing_dependency("tensorrt_stubs", "dev", "type-checking the TensorRT code")
    root = Path(spec.origin).resolve().parent.parent
    if not (root / "tensorrt_bindings" / "tensorrt.pyi").is_file():
        raise missing_dependency("tensorrt_stubs", "dev", "type-checking the TensorRT code")
    return root


def repair_stub(text: str) -> str:
    """Fix the stubgen defects of ``tensorrt_bindings/tensorrt.pyi`` that stop mypy's parser."""
    lines = []
    for line in text.splitlines():
        if line.startswith("bool: "):
            lines.append(line)
            continue
        line = _IN_PARAM.sub(r"\1in_: ", line)
        line = line.replace("power: Weights = None, channel_axis: int)",
                            "power: Weights = None, channel_axis: int = ...)")
        lines.append(_BOOL.sub(r"\1builtins.bool", line))
    return _HEADER + "\n".join(lines) + "\n"


def write_repaired_stubs(dest: Path) -> Path:
    """Write the repaired ``tensorrt`` and ``tensorrt_bindings`` stubs under ``dest``."""
    src = installed_stub_dir()
    for pkg in ("tensorrt", "tensorrt_bindings"):
        (dest / pkg).mkdir(parents=True, exist_ok=True)
        for pyi in (src / pkg).glob("*.pyi"):
            text = pyi.read_text()
            (dest / pkg / pyi.name).write_text(repair_stub(text) if pyi.name == "tensorrt.pyi" else text)
    return dest


def run_mypy(paths: list[str]) -> tuple[str, int]:
    """Run mypy on ``paths`` against the repaired stubs; returns (report, exit status)."""
    from mypy import api

    with tempfile.TemporaryDirectory(prefix="ism-edge-trt-stubs-") as tmp:
        stubs = write_repaired_stubs(Path(tmp) / "stubs")
        config = Path(tmp) / "mypy.ini"
        config.write_text(_CONFIG.replace("[mypy]\n", f"[mypy]\nmypy_path = {stubs}\n", 1))
        out, err, status = api.run(["--config-file", str(config), "--no-incremental", *paths])
    return out + err, status


def main(argv: list[str] | None = None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv) or ["engines/tensorrt_build.py"]
    report, status = run_mypy(paths)
    sys.stdout.write(report)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
