"""The sub-pixel rewrite of strided transposed convolutions computes the same map (ism_edge_engines.subpixel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from ism_edge_engines.subpixel import phase_offsets, subpixel_from_onnx, subpixel_model  # noqa: E402


def _deconv_graph(path: Path, *, c_in: int = 4, c_out: int = 3, k: int = 3, stride: int = 2, pads=(1, 1, 1, 1),
                  out_pad=(1, 1), bias: bool = True, act: str | None = "LeakyRelu", group: int = 1,
                  dilation: int = 1, size: int = 5, dtype=np.float32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    inits = [numpy_helper.from_array(rng.standard_normal((c_in, c_out // group, k, k)).astype(dtype), "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_out).astype(dtype), "B"))
        inputs.append("B")
    nodes = [helper.make_node("ConvTranspose", inputs, ["y0" if act else "y"], name="deconv", strides=[stride, stride],
                              pads=list(pads), output_padding=list(out_pad), group=group,
                              dilations=[dilation, dilation])]
    if act == "LeakyRelu":
        nodes.append(helper.make_node("LeakyRelu", ["y0"], ["y"], name="act", alpha=0.2))
    elif act:
        nodes.append(helper.make_node(act, ["y0"], ["y"], name="act"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, ["N", c_in, size, size])],
                              [helper.make_tensor_value_info("y", elem, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize(("k", "pads", "out_pad", "c_out", "act", "bias"), [
    (3, (1, 1, 1, 1), (1, 1), 3, "LeakyRelu", True),   # the mapper's 3×3 layers
    (5, (2, 2, 2, 2), (1, 1), 8, "Relu", True),        # its 5×5 layer
    (7, (3, 3, 3, 3), (1, 1), 3, "Sigmoid", False),    # its 7×7 output layer
    (4, (1, 1, 1, 1), (0, 0), 2, None, True),          # the common k=4, p=1 upsampler
    (2, (0, 0, 0, 0), (0, 0), 5, "Tanh", True),        # k = stride: one tap per phase
    (4, (2, 1, 0, 1), (0, 0), 3, None, False),         # asymmetric pads
])
def test_rewrite_is_the_same_map(tmp_path: Path, k, pads, out_pad, c_out, act, bias) -> None:
    src = _deconv_graph(tmp_path / "d.onnx", k=k, pads=pads, out_pad=out_pad, c_out=c_out, act=act, bias=bias)
    dst = subpixel_from_onnx(src, tmp_path / "d.subpixel.onnx")
    assert dst is not None
    rewritten = onnx.load(str(dst))
    ops = [n.op_type for n in rewritten.graph.node]
    assert "ConvTranspose" not in ops and ops[0] == "Conv" and ops[-1] == "DepthToSpace"
    if act:  # the activation runs on the phases, before the shuffle, where ONNX Runtime fuses it
        assert ops == ["Conv", act, "DepthToSpace"]
    x = np.random.default_rng(1).standard_normal((3, 4, 5, 5)).astype(np.float32)
    want, got = _run(src, x), _run(dst, x)
    assert got.shape == want.shape == (3, c_out, 10, 10)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_stride_three_and_fp16(tmp_path: Path) -> None:
    src = _deconv_graph(tmp_path / "d.onnx", k=3, stride=3, pads=(0, 0, 0, 0), out_pad=(0, 0), dtype=np.float16)
    dst = subpixel_from_onnx(src, tmp_path / "d.subpixel.onnx")
    assert dst is not None
    x = np.random.default_rng(2).standard_normal((2, 4, 5, 5)).astype(np.float16)
    np.testing.assert_allclose(_run(dst, x).astype(np.float32), _run(src, x).astype(np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("case", [
    {"group": 3, "c_in": 3, "c_out": 3},                      # grouped
    {"dilation": 2},                                          # dilated
    {"out_pad": (0, 0)},                                      # output is not 2 × input (2H − 1)
    {"stride": 1, "out_pad": (0, 0)},                         # not strided: nothing to gain
    {"out_pad": (1, 0)},                                      # one axis 2H, the other 2W − 1
])
def test_ineligible_nodes_are_left_alone(tmp_path: Path, case: dict) -> None:
    src = _deconv_graph(tmp_path / "d.onnx", **case)
    model, rewritten = subpixel_model(onnx.load(str(src)))
    assert rewritten == 0
    assert [n.op_type for n in model.graph.node][0] == "ConvTranspose"
    assert subpixel_from_onnx(src, tmp_path / "out.onnx") is None
    assert not (tmp_path / "out.onnx").exists()


def test_phase_offsets_cover_every_tap_once() -> None:
    for k in range(1, 9):
        for s in (2, 3):
            for pb in range(k):
                taps = sorted(s * d + r + pb for r, ds in enumerate(phase_offsets(k, s, pb)) for d in ds)
                assert taps == list(range(k))
