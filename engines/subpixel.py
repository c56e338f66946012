"""Strided ``ConvTranspose`` → sub-pixel ``Conv`` + ``DepthToSpace`` for ONNX Runtime's CPU provider.

ONNX Runtime's CPU ``ConvTranspose`` is a GEMM followed by a scalar col2im; its ``Conv`` runs in the
blocked NCHWc layout with the activation fused, so the mapping network's transposed convolutions
dominate its CPU time (measured in docs/performance.md). A transposed convolution of
stride ``s`` whose output is exactly ``s`` times its input is the same map as one convolution with
``s²·C_out`` output channels (one group per output phase ``(r_y, r_x)``) followed by
``DepthToSpace(s, DCR)``:

    y[c, s·m + r_y, s·n + r_x] = Σ_{d_y, d_x} x[:, m − d_y, n − d_x] · W[:, c, s·d_y + r_y + p_y, s·d_x + r_x + p_x]

The phases' taps are put in one kernel spanning the union of their offsets ``d`` (zeros where a
phase has no tap), so a layer is one GEMM. That kernel does more multiply-adds than the transposed
convolution (its zero taps: 36/25 for 5×5, 16/9 for 3×3, 64/49 for 7×7 kernels at stride 2);
``ism_edge.bench.flops`` counts the model's FLOPs from the un-rewritten graph, so the share of
peak is not flattered by them. An element-wise activation that alone consumes the transposed
convolution's output is moved before the ``DepthToSpace`` (it commutes with it), where ONNX Runtime
fuses it into the ``Conv``.

Only ONNX Runtime builds use the rewritten graph (``onnx/{role}.subpixel.onnx``); TensorRT gets
the exported graph as it is, and so does INT8 quantization (which quantizes ``Conv`` only).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ism_edge.errors import missing_dependency
from ism_edge_engines.export import save_pass_output

if TYPE_CHECKING:
    import numpy as np
    import onnx

#: Element-wise activations moved before the ``DepthToSpace`` (ONNX Runtime fuses them into ``Conv``).
MOVABLE_ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh"})


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def phase_offsets(kernel: int, stride: int, pad_begin: int) -> list[list[int]]:
    """For each output phase ``r`` (0 ≤ r < stride), the input offsets ``d`` it reads.

    Output ``s·m + r`` of a transposed convolution reads input ``m − d`` through tap
    ``s·d + r + pad_begin``, for every ``d`` that puts the tap inside the kernel.
    """
    return [[d for d in range(-kernel, kernel + 1) if 0 <= stride * d + r + pad_begin < kernel] for r in range(stride)]


def subpixel_weights(
    weight: np.ndarray, stride: int, pads: tuple[int, int]
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A ``ConvTranspose`` weight ``[C_in, C_out, k_h, k_w]`` → the sub-pixel ``Conv`` weight and pads.

    Returns the weight ``[s²·C_out, C_in, n_h, n_w]`` (output channel ``(r_y·s + r_x)·C_out + c``,
    the ``DepthToSpace`` DCR order) and the ``Conv`` pads ``(top, left, bottom, right)``.
    """
    import numpy as np

    c_in, c_out, kh, kw = weight.shape
    offsets = []
    for k, pb in ((kh, pads[0]), (kw, pads[1])):
        union = sorted({d for phase in phase_offsets(k, stride, pb) for d in phase})
        offsets.append(list(range(union[0], union[-1] + 1)))
    dys, dxs = offsets
    out = np.zeros((stride, stride, c_out, c_in, len(dys), len(dxs)), dtype=weight.dtype)
    for ry in range(stride):
        for rx in range(stride):
            for jy, dy in enumerate(reversed(dys)):  # Conv reads input m + j − pad_top = m − d
                ty = stride * dy + ry + pads[0]
                if not 0 <= ty < kh:
                    continue
                for jx, dx in enumerate(reversed(dxs)):
                    tx = stride * dx + rx + pads[1]
                    if 0 <= tx < kw:
                        out[ry, rx, :, :, jy, jx] = weight[:, :, ty, tx].T
    conv_pads = (dys[-1], dxs[-1], -dys[0], -dxs[0])
    return out.reshape(stride * stride * c_out, c_in, len(dys), len(dxs)), conv_pads


def _eligible(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[int, tuple[int, int]] | None:
    """``(stride, (pad_top, pad_left))`` when ``node`` can be rewritten, else ``None``."""
    from onnx import numpy_helper

    if node.op_type != "ConvTranspose" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    if node.input[1] not in inits or (len(node.input) > 2 and node.input[2] and node.input[2] not in inits):
        return None
    a = _attrs(node)
    kh_kw = numpy_helper.to_array(inits[node.input[1]]).shape
    if len(kh_kw) != 4 or a.get("group", 1) != 1 or "output_shape" in a:
        return None
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    strides = list(a.get("strides", [1, 1]))
    pads = list(a.get("pads", [0, 0, 0, 0]))
    out_pad = list(a.get("output_padding", [0, 0]))
    if list(a.get("dilations", [1, 1])) != [1, 1] or strides[0] != strides[1] or strides[0] < 2:
        return None
    s = strides[0]
    for axis, k in enumerate(kh_kw[2:]):
        if k + out_pad[axis] - pads[axis] - pads[axis + 2] != s:  # output must be exactly s × input
            return None
        union = {d for phase in phase_offsets(k, s, pads[axis]) for d in phase}
        if not union or min(union) > 0 or max(union) < 0:  # Conv pads would be negative
            return None
    return s, (pads[0], pads[1])


def subpixel_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite every eligible ``ConvTranspose`` of ``model`` in place; returns it and their number."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    moved: set[int] = set()
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in graph.node:
        if id(node) in moved:
            continue
        found = _eligible(node, inits)
        if found is None:
            nodes.append(node)
            continue
        stride, pad_begin = found
        weight, conv_pads = subpixel_weights(numpy_helper.to_array(inits[node.input[1]]), stride, pad_begin)
        base = node.name or node.output[0]
        inputs = [node.input[0], f"{base}__subpixel_W"]
        graph.initializer.append(numpy_helper.from_array(weight, inputs[1]))
        if len(node.input) > 2 and node.input[2]:
            import numpy as np

            bias = numpy_helper.to_array(inits[node.input[2]])
            inputs.append(f"{base}__subpixel_B")
            graph.initializer.append(numpy_helper.from_array(np.tile(bias, stride * stride), inputs[2]))
        after = consumers.get(node.output[0], [])
        act = after[0] if (len(after) == 1 and after[0].op_type in MOVABLE_ACTIVATIONS
                           and after[0].domain in ("", "ai.onnx") and node.output[0] not in graph_outputs) else None
        phases = f"{base}__subpixel_phases"
        nodes.append(helper.make_node("Conv", inputs, [phases], name=f"{base}__subpixel_conv",
                                      kernel_shape=list(weight.shape[2:]), pads=list(conv_pads)))
        final = node.output[0]
        if act is not None:
            moved.add(id(act))
            activated = f"{phases}_{act.op_type.lower()}"
            nodes.append(helper.make_node(act.op_type, [phases], [activated], name=act.name, **_attrs(act)))
            phases, final = activated, act.output[0]
        nodes.append(helper.make_node("DepthToSpace", [phases], [final], name=f"{base}__subpixel_d2s",
                                      blocksize=stride, mode="DCR"))
        rewritten += 1
    if rewritten:
        used = {i for n in nodes for i in n.input}
        kept = [t for t in graph.initializer if t.name in used]
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.initializer[:]
        graph.initializer.extend(kept)
        del graph.value_info[:]
    return model, rewritten


def subpixel_from_onnx(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path | None:
    """Write the sub-pixel variant of the graph ``src`` to ``dst``; ``None`` (nothing written) when
    ``src`` has no transposed convolution to rewrite."""
    try:
        import onnx
    except ImportError:
        raise missing_dependency("onnx", "train", "rewriting transposed convolutions") from None

    src, dst = Path(src), Path(dst)
    model, rewritten = subpixel_model(onnx.load(str(src)))
    if not rewritten:
        return None
    return save_pass_output(model, dst, src=src, what="sub-pixel rewrite", tag=("ism_edge.subpixel", str(rewritten)))
