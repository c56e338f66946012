"""ism-edge runtime: filter camera frames through a compiled adversarial defense.

``from ism_edge import DefenseRuntime`` loads an engine directory built by ``ism-edge build``.
This package never imports torch; TensorRT and CUDA bindings are imported lazily where used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ism_edge.errors import IsmEdgeError

__version__ = "0.1.0"
__all__ = ["DefenseRuntime", "Verdict", "IsmEdgeError", "__version__"]

if TYPE_CHECKING:
    from ism_edge.runtime import DefenseRuntime
    from ism_edge.verdict import Verdict


def __getattr__(name: str) -> Any:
    if name == "DefenseRuntime":
        from ism_edge.runtime import DefenseRuntime

        return DefenseRuntime
    if name == "Verdict":
        from ism_edge.verdict import Verdict

        return Verdict
    raise AttributeError(f"module 'ism_edge' has no attribute {name!r}")
