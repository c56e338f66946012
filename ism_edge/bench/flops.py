"""FLOP counts of the defense chain, read from its ONNX graphs (for the share-of-peak figure).

Convention: **1 multiply-accumulate (MAC) = 2 FLOPs**. Counted are the dense operators —
``Conv``, ``ConvTranspose``, ``Gemm`` and ``MatMul`` — at batch 1, with shapes from ONNX shape
inference; element-wise operators, pooling, normalisation, top-k and reductions are not counted
(they are a few per cent of the work and are not what a GEMM peak measures).

* ``Conv``: MACs = |output| · (C_in/groups) · k_h · k_w
* ``ConvTranspose``: MACs = |input| · (C_out/groups) · k_h · k_w
* ``Gemm`` / ``MatMul``: MACs = |output| · K

The chain costs, per model input, M once (plus once per feedback round actually run), C twice
(on x and on x̂) and P once: ``mapper + 2·classifier + perturbation``. Needs the ``onnx``
package (imported lazily; it comes with the ``[train]`` extra).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ism_edge.errors import EngineError, missing_dependency
from ism_edge.manifest import ROLES, load_manifest

COUNTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: How many times the chain runs each graph per model input (feedback rounds aside).
CHAIN_MULTIPLICITY = {"mapper": 1, "classifier": 2, "perturbation": 1}
CONVENTION = (
    "1 MAC = 2 FLOPs; Conv, ConvTranspose, Gemm and MatMul of the FP32 ONNX graphs at batch 1; "
    "chain = mapper + 2 x classifier + perturbation per model input"
)


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise missing_dependency("onnx", "train", "counting the FLOPs of the ONNX graphs") from None
    return onnx


@dataclass(frozen=True)
class GraphFlops:
    """MACs of one ONNX graph at batch 1, by operator type."""

    role: str
    path: str
    macs_by_op: dict[str, int]

    @property
    def macs(self) -> int:
        return sum(self.macs_by_op.values())

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "macs": self.macs, "flops": self.flops, "macs_by_op": dict(self.macs_by_op)}


@dataclass(frozen=True)
class ChainFlops:
    """FLOPs of the three graphs and of the whole chain per model input."""

    graphs: dict[str, GraphFlops]

    @property
    def per_input(self) -> int:
        """FLOPs per model input: M + 2·C + P (no feedback rounds)."""
        return sum(CHAIN_MULTIPLICITY[r] * g.flops for r, g in self.graphs.items())

    def to_json(self) -> dict[str, Any]:
        return {
            "convention": CONVENTION,
            "per_input": self.per_input,
            "graphs": {r: g.to_json() for r, g in self.graphs.items()},
        }


def _static(shape: Any) -> list[int] | None:
    dims = []
    for d in shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(int(d.dim_value))
    return dims


def graph_macs(path: str | Path, *, batch: int = 1) -> dict[str, int]:
    """MACs of the dense operators of the ONNX graph at ``path`` with every batch axis = ``batch``.

    Raises :class:`EngineError` naming the graph when a shape cannot be inferred.
    """
    onnx = _onnx()
    path = Path(path)
    try:
        model = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError and friends
        raise EngineError(f"{path} cannot be read as an ONNX graph ({type(e).__name__}): "
                          "rebuild the engines with 'ism-edge build'") from None
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int] | None] = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        shapes[value.name] = _static(value.type.tensor_type.shape)
    for init in inferred.graph.initializer:
        shapes[init.name] = [int(d) for d in init.dims]

    macs: dict[str, int] = {}
    for node in inferred.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        ins = [shapes.get(n) for n in node.input]
        out = shapes.get(node.output[0])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            w = ins[1]
            count = None if out is None or w is None else math.prod(out) * math.prod(w[1:])
        elif node.op_type == "ConvTranspose":
            x, w = ins[0], ins[1]
            count = None if x is None or w is None else math.prod(x) * math.prod(w[1:])
        elif node.op_type == "Gemm":
            a = ins[0]
            k = None if a is None else (a[0] if attrs.get("transA", 0) else a[1])
            count = None if out is None or k is None else math.prod(out) * k
        else:  # MatMul
            a = ins[0]
            count = None if out is None or a is None else math.prod(out) * a[-1]
        if count is None:
            raise EngineError(f"{path}: the shapes around {node.op_type} node {node.name!r} cannot be inferred, "
                              "so its FLOPs are unknown")
        macs[node.op_type] = macs.get(node.op_type, 0) + int(count)
    return macs


def fp32_graph(directory: str | Path, role: str) -> Path:
    """The FP32 ONNX source graph of ``role`` in an engine directory (every build writes one)."""
    directory = Path(directory)
    path = directory / "onnx" / f"{role}.onnx"
    if path.is_file():
        return path
    manifest = load_manifest(directory, verify_files=False)
    return directory / manifest.engines[role].onnx


def chain_flops(directory: str | Path) -> ChainFlops:
    """FLOPs of the chain of an engine directory, from its FP32 ONNX graphs (see module doc)."""
    graphs = {}
    for role in ROLES:
        path = fp32_graph(directory, role)
        graphs[role] = GraphFlops(role, str(path), graph_macs(path))
    return ChainFlops(graphs)
