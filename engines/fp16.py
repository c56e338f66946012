"""FP32 ONNX graph → mixed-precision FP16 graph with FP32 inputs and outputs (docs/engines.md, "FP16 in the graph").

TensorRT 11 networks are strongly typed (the FP16 builder flag is gone), so the precision of every
layer must be written in the graph itself; one FP16 graph then builds on TensorRT 10 (JetPack 6)
and 11 alike.

A small pass rather than a converter library: ``onnxconverter_common.float16`` (1.16) produced a
graph that ``onnx.checker`` rejects when a graph output (``x_hat``) also feeds kept-FP32 nodes, and
``onnxruntime.transformers.float16`` (1.32) emits unsorted nodes and rounds kept-FP32 tensors
through FP16 between two blocked ops. The rules here are three:

* **compute** ops (``Conv``, ``ConvTranspose``, ``Gemm``, ``MatMul``) run in FP16, their weights
  stored in FP16;
* **follow** ops (activations, pooling, batch-norm, ``Add``/``Mul``, reshapes) run in the precision of
  their non-constant inputs, so no cast pair is inserted around a reshape;
* every other op stays FP32: the reductions of the reconstruction error (``Sub``, ``Abs``,
  ``ReduceMean``), the input normalisation (``Sub``, ``Div``), ``Sigmoid``/``Softmax``, the k-sparse
  selection (``TopK``, ``GatherElements``, ``ScatterElements``) and anything not listed.

``Cast`` nodes are inserted at every FP16/FP32 boundary (one per tensor), graph inputs and outputs
stay FP32.
"""

from __future__ import annotations

import os
from pathlib import Path

from ism_edge.errors import EngineError, missing_dependency
from ism_edge_engines.export import save_pass_output

COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
FOLLOW_OPS = frozenset({
    "Relu", "LeakyRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
    "BatchNormalization", "Add", "Mul", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
    "Transpose", "Identity", "Concat",
})
FP16_MAX = 65504.0


def fp16_from_onnx(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write the mixed-precision FP16 variant of the FP32 graph ``src`` to ``dst`` and check it."""
    try:
        import numpy as np
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:
        raise missing_dependency(e.name or "onnx", "train", "converting ONNX graphs to FP16") from None

    src, dst = Path(src), Path(dst)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(src)), strict_mode=True)
    graph = model.graph
    types: dict[str, int] = {}
    for v in (*graph.input, *graph.value_info, *graph.output):
        types[v.name] = v.type.tensor_type.elem_type
    inits = {t.name: t for t in graph.initializer}
    for name, t in inits.items():
        types[name] = t.data_type
    missing = [o for n in graph.node for o in n.output if o and o not in types]
    if missing:
        raise EngineError(f"{src}: shape inference gave no type for {missing[:3]}: cannot convert it to FP16")

    half: set[str] = set()  # tensors that are FP16 in the new graph
    casts: dict[tuple[str, int], str] = {}
    new_inits: dict[str, onnx.TensorProto] = {}
    nodes: list[onnx.NodeProto] = []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            out = f"{name}__to_{'fp16' if to == TensorProto.FLOAT16 else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [out], name=f"{out}_cast", to=to))
            casts[key] = out
        return casts[key]

    def init16(name: str) -> str:
        new = f"{name}__fp16"
        if new not in new_inits:
            arr = numpy_helper.to_array(inits[name]).astype(np.float32)
            arr16 = np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16)
            new_inits[new] = numpy_helper.from_array(arr16, new)
        return new

    for node in graph.node:
        floats = [i for i in node.input if i and types.get(i) == TensorProto.FLOAT]
        in_default_domain = node.domain in ("", "ai.onnx")
        if node.op_type in COMPUTE_OPS and in_default_domain:
            is_half = True
        elif node.op_type in FOLLOW_OPS and in_default_domain:
            live = [i for i in floats if i not in inits]
            is_half = bool(live) and all(i in half for i in live)
        else:
            is_half = False
        for k, name in enumerate(node.input):
            if name not in floats:
                continue
            if is_half and name not in half:
                node.input[k] = init16(name) if name in inits else cast(name, TensorProto.FLOAT16)
            elif not is_half and name in half:
                node.input[k] = cast(name, TensorProto.FLOAT)
        if is_half:
            half.update(o for o in node.output if types.get(o) == TensorProto.FLOAT)
        nodes.append(node)

    for out in graph.output:
        if out.name not in half:
            continue
        inner = f"{out.name}__fp16_out"
        for n in nodes:
            for seq in (n.input, n.output):
                for k, name in enumerate(seq):
                    if name == out.name:
                        seq[k] = inner
        nodes.append(
            helper.make_node("Cast", [inner], [out.name], name=f"{out.name}_output_cast", to=TensorProto.FLOAT)
        )

    used = {i for n in nodes for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend([*kept, *new_inits.values()])
    del graph.value_info[:]
    return save_pass_output(model, dst, src=src, what="FP16 conversion", tag=("ism_edge.precision", "fp16"))


def precision_summary(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Op types per precision of a converted graph: ``{"fp16": [...], "fp32": [...]}`` (for docs and tests)."""
    import onnx
    from onnx import TensorProto

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {
        v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.output, *model.graph.input)
    }
    types.update({t.name: t.data_type for t in model.graph.initializer})
    out: dict[str, set[str]] = {"fp16": set(), "fp32": set()}
    for n in model.graph.node:
        if n.op_type == "Cast":
            continue
        kinds = {types.get(i) for i in n.input if i}
        if TensorProto.FLOAT16 in kinds:
            out["fp16"].add(n.op_type)
        if TensorProto.FLOAT in kinds:
            out["fp32"].add(n.op_type)
    return {k: sorted(v) for k, v in out.items()}
