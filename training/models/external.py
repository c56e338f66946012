"""A user's own classifier as the defense's classifier C (``ism-edge train --classifier``).

The classifier comes as an ONNX file, or as a PyTorch ``package.module:factory`` plus a weights
file, which is exported to ONNX once here. Either way the bundle keeps the ONNX graph, and that
graph is what the engines compile: :func:`classifier_graph` puts the conversion from the
defense's pixels (float32 NCHW RGB in [0, 1], what M, P and the runtime's preprocessing work on)
to the model's own input contract (:class:`ism_edge.contract.ClassifierInput`) in front of the
user's nodes, which stay as they are, and names the input ``x`` and the output ``logits``.

For gradients (training M and P, the attacks of the evaluation) the graph is converted to PyTorch
with ``onnx2torch``; :class:`ExternalClassifier` runs the same contract conversion in PyTorch
before it. The conversion is checked against ONNX Runtime on real images when the classifier is
read, so what the defense is trained around is what the engines run. The classifier is frozen:
no recipe stage changes its weights, unless ``ism-edge train --finetune adversarial`` asks for the
recipe's adversarial training of a copy (:meth:`ExternalClassifier.trainable_copy`) and, unless
``--no-distill``, the distillation of a second copy from it, which is then exported back to ONNX at
the user's input contract (:func:`finetuned_classifier`) and frozen again.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.util
import io
import re
import sys
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ism_edge.contract import ClassifierInput
from ism_edge.errors import BundleError, MissingDependencyError, missing_dependency

if TYPE_CHECKING:
    import onnx

#: onnx2torch converts opsets up to 17 for every operator a classifier uses (its ReduceMean, for
#: one, stops at 17); newer graphs are converted to opset 17 for PyTorch only.
TORCH_OPSET = 17
#: Where the user's input and output tensors are renamed to when their names are the graph's
#: contract names (``x``, ``logits``).
USER_INPUT = "ism_edge.user_input"
USER_OUTPUT = "ism_edge.user_output"
PROBABILITY_FLOOR = 1e-12
#: Classifier outputs of PyTorch and ONNX Runtime on the same images must agree this closely
#: (max |Δ| relative to the largest |output|) for the converted classifier to be used.
CONVERSION_TOLERANCE = 1e-3
#: ``ism-edge train --finetune``: ``none`` keeps the user's classifier frozen; ``adversarial`` runs
#: the recipe's adversarial stage on a copy of it first.
FINETUNE_METHODS = ("none", "adversarial")


@dataclass(frozen=True)
class ClassifierSource:
    """What ``ism-edge train --classifier`` was given; ``None`` fields are read from the graph.

    ``path``: an ``.onnx`` file or ``package.module:factory``; ``weights``: the factory's weights
    (safetensors or a ``torch.save`` state dict). ``input_size`` (height, width) is needed where
    the graph's spatial size is dynamic and always for a factory.
    """

    path: str
    weights: Path | None = None
    input_size: tuple[int, int] | None = None
    layout: str | None = None
    channel_order: str = "RGB"
    scale: float = 1.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    output: str = "logits"

    @property
    def is_factory(self) -> bool:
        return not self.path.lower().endswith(".onnx") and ":" in self.path and not Path(self.path).exists()


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise missing_dependency("onnx", "train", "reading an ONNX classifier") from None
    return onnx


def import_onnx2torch() -> Any:
    """Import ``onnx2torch``, whose package imports torchvision for two detection operators.

    A PyTorch without torchvision (the CPU wheels this project tests with) still converts
    classifiers: torchvision is then stood in for, during the import only, by a module whose
    ``nms``/``roi_align`` say that they need it.
    """
    if "onnx2torch" in sys.modules:
        return sys.modules["onnx2torch"]
    if importlib.util.find_spec("onnx2torch") is None:
        raise MissingDependencyError("converting an ONNX classifier to PyTorch needs the Python module 'onnx2torch', "
                                     "which is not installed: pip install --no-deps 'onnx2torch>=1.5,<2' (its "
                                     "torchvision requirement is not needed)")
    if importlib.util.find_spec("torchvision") is not None:
        import onnx2torch

        return onnx2torch

    def needs_torchvision(*_: Any, **__: Any) -> Any:
        raise BundleError("the classifier uses a detection operator (NonMaxSuppression, RoiAlign) that needs "
                          "torchvision: pip install torchvision")

    tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    ops.nms = ops.roi_align = needs_torchvision  # type: ignore[attr-defined]
    tv.ops = ops  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops
    try:
        import onnx2torch
    finally:
        del sys.modules["torchvision"], sys.modules["torchvision.ops"]
    return onnx2torch


# -- reading the user's graph ------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message, without terminal colour codes (torch.export's)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return (text.splitlines() or [type(e).__name__])[0][:300]


def _dims(value: Any) -> list[int | str | None]:
    """A graph input's or output's shape: ints, dim_param names, or None for unknown."""
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value.type.tensor_type.shape.dim]


def _graph_io(model: onnx.ModelProto, where: str) -> tuple[Any, Any]:
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise BundleError(f"{where} has {len(inputs)} inputs and {len(model.graph.output)} outputs: a classifier "
                          "takes one image batch and gives one [N, classes] output")
    return inputs[0], model.graph.output[0]


def read_onnx(path: Path) -> onnx.ModelProto:
    """The user's ONNX graph, refused in one line unless it parses and passes ``onnx.checker``."""
    onnx = _onnx()
    if not path.is_file():
        raise BundleError(f"classifier {path} does not exist: pass an .onnx file or package.module:factory")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # onnx raises DecodeError, ValidationError, InferenceError, ...
        raise BundleError(f"classifier {path} is not a valid ONNX model ({_first_line(e)}): export it again "
                          "(torch.onnx.export, tf2onnx, ...)") from None
    return model


def contract_of(model: onnx.ModelProto, src: ClassifierSource, where: str) -> ClassifierInput:
    """The input contract: the graph's static input shape and the user's options.

    The layout is where the graph's 3-channel axis is (or ``src.layout``); the size is the
    graph's static height and width, which ``src.input_size`` must match, and which it must give
    when they are dynamic.
    """
    image, _ = _graph_io(model, where)
    dims = _dims(image)
    if len(dims) != 4:
        raise BundleError(f"{where}: input {image.name!r} has shape {dims}, a classifier takes a 4-D image batch "
                          "[N, 3, H, W] or [N, H, W, 3]")
    layout = src.layout
    if layout is None:
        layout = "NCHW" if dims[1] == 3 else "NHWC" if dims[3] == 3 else None
        if layout is None:
            raise BundleError(f"{where}: input {image.name!r} has shape {dims}, with no 3-channel axis: pass "
                              "--layout nchw or nhwc")
    channel_axis, spatial = (1, (2, 3)) if layout == "NCHW" else (3, (1, 2))
    if isinstance(dims[channel_axis], int) and dims[channel_axis] not in (0, 3):
        raise BundleError(f"{where}: input {image.name!r} has {dims[channel_axis]} channels ({layout}); "
                          "ism-edge protects 3-channel (colour) classifiers")
    static = tuple(d if isinstance(d, int) and d > 0 else None for d in (dims[spatial[0]], dims[spatial[1]]))
    if src.input_size is None:
        if None in static:
            raise BundleError(f"{where}: input {image.name!r} has a dynamic height or width {dims}: pass "
                              "--input-size HxW (the size the model was trained at)")
        size = (int(static[0]), int(static[1]))  # type: ignore[arg-type]
    else:
        size = src.input_size
        if any(s is not None and s != want for s, want in zip(static, size, strict=True)):
            raise BundleError(f"{where}: --input-size {size[0]}x{size[1]} does not match the graph's input "
                              f"{image.name!r} {dims}: drop --input-size or export the model at that size")
    try:
        return ClassifierInput(height=size[0], width=size[1], layout=layout, channel_order=src.channel_order,
                               scale=src.scale, mean=src.mean, std=src.std, output=src.output)
    except ValueError as e:
        raise BundleError(f"{where}: {e}") from None


def _with_dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with its input's and output's first axis named ``N``: a graph exported at a fixed
    batch of 1 often runs at any batch (the runtime batches frames and tiles); :func:`probe`
    checks that it does."""
    onnx = _onnx()
    model = onnx.ModelProto.FromString(model.SerializeToString())
    image, out = _graph_io(model, "")
    for value in (image, out):
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "N"
    return model


def _ort_session(model: onnx.ModelProto, where: str) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise missing_dependency("onnxruntime", "train", "checking an ONNX classifier") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # the refusal below is the one line; ORT's own log would add more
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        raise BundleError(f"{where}: ONNX Runtime cannot load the graph ({_first_line(e)})") from None


def user_input(x: np.ndarray, contract: ClassifierInput) -> np.ndarray:
    """The defense's pixels (float32 NCHW RGB in [0, 1]) in the user's contract (numpy)."""
    c = contract
    if c.channel_order == "BGR":
        x = x[:, ::-1]
    x = x * np.float32(c.scale)
    x = (x - np.asarray(c.mean, np.float32).reshape(1, 3, 1, 1)) / np.asarray(c.std, np.float32).reshape(1, 3, 1, 1)
    if c.layout == "NHWC":
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def probe(model: onnx.ModelProto, contract: ClassifierInput, x: np.ndarray, where: str) -> tuple[Any, np.ndarray]:
    """Run the user's graph on ``x`` (defense pixels) with ONNX Runtime: its session and its
    outputs, refused unless they are ``[N, classes]`` with classes >= 2 and finite."""
    import onnxruntime as ort

    session = _ort_session(model, where)
    name = session.get_inputs()[0].name
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4
    try:
        out = session.run(None, {name: user_input(x, contract)}, quiet)[0]
    except Exception as e:  # noqa: BLE001
        text = str(e)
        human = re.search(r"([A-Z][^.:]*(?:cannot|not|invalid|mismatch)[^.]*\.)", text.split("Status Message:")[-1])
        detail = human.group(1) if human else _first_line(e)[:160]
        raise BundleError(f"{where}: the graph does not run on a batch of {len(x)} images of "
                          f"{contract.height}x{contract.width} ({detail}): export it with a dynamic batch axis "
                          "(torch.onnx.export(..., dynamic_shapes=...)) and check --input-size/--layout") from None
    out = np.asarray(out)
    if out.ndim != 2 or out.shape[0] != len(x) or out.shape[1] < 2:
        raise BundleError(f"{where}: its output has shape {list(out.shape)} for {len(x)} images; the defense needs "
                          "[N, classes] logits or probabilities (classes >= 2)")
    if not np.isfinite(out).all():
        raise BundleError(f"{where}: its output holds NaN or infinite values on real images")
    return session, out


def _renamed(graph: Any, old: str, new: str) -> None:
    """Rename tensor ``old`` to ``new`` throughout ``graph`` (names only: the computation is unchanged)."""
    for node in graph.node:
        for seq in (node.input, node.output):
            for i, n in enumerate(seq):
                if n == old:
                    seq[i] = new
    for seq in (graph.input, graph.output, graph.value_info, graph.initializer):
        for v in seq:
            if v.name == old:
                v.name = new


def classifier_graph(user: onnx.ModelProto, contract: ClassifierInput, num_classes: int) -> onnx.ModelProto:
    """The classifier graph the engines compile: ``x`` (float32 [N, 3, H, W], RGB in [0, 1]) →
    the contract conversion → the user's nodes, unchanged → ``logits`` [N, classes].

    The conversion is ``Gather`` (BGR), ``Mul`` (scale), ``Sub`` (mean), ``Div`` (std) and
    ``Transpose`` (NHWC), each only where the contract needs it, in the order of
    :class:`ContractAdapter`; probabilities become logits by ``Log(Max(p, 1e-12))``.
    """
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    model = _with_dynamic_batch(user)
    graph = model.graph
    image, out = _graph_io(model, "")
    in_name, out_name = image.name, out.name
    if in_name != USER_INPUT:
        _renamed(graph, in_name, USER_INPUT)
    if out_name != USER_OUTPUT:
        _renamed(graph, out_name, USER_OUTPUT)
    taken = {n for node in graph.node for n in (*node.input, *node.output)} | {t.name for t in graph.initializer}
    for name in ("x", "logits"):
        if name in taken:
            _renamed(graph, name, f"ism_edge.user.{name}")
    c = contract
    nodes, consts = [], []
    current = "x"

    def step(op: str, const: np.ndarray | None = None, **attrs: Any) -> None:
        nonlocal current
        k = len(nodes)
        inputs = [current]
        if const is not None:
            consts.append(numpy_helper.from_array(const, f"ism_edge.contract.{k}"))
            inputs.append(consts[-1].name)
        out_t = f"ism_edge.contract.{k}.out"
        nodes.append(helper.make_node(op, inputs, [out_t], name=f"ism_edge.contract.{k}.{op}", **attrs))
        current = out_t

    if c.channel_order == "BGR":
        step("Gather", np.array([2, 1, 0], np.int64), axis=1)
    if c.scale != 1.0:
        step("Mul", np.array(c.scale, np.float32))
    if any(m != 0.0 for m in c.mean):
        step("Sub", np.asarray(c.mean, np.float32).reshape(1, 3, 1, 1))
    if any(s != 1.0 for s in c.std):
        step("Div", np.asarray(c.std, np.float32).reshape(1, 3, 1, 1))
    if c.layout == "NHWC":
        step("Transpose", perm=[0, 2, 3, 1])
    nodes.append(helper.make_node("Identity", [current], [USER_INPUT], name="ism_edge.contract.to_user"))
    tail = [helper.make_node("Identity", [USER_OUTPUT], ["logits"], name="ism_edge.output")]
    if c.output == "probabilities":
        consts.append(numpy_helper.from_array(np.array(PROBABILITY_FLOOR, np.float32), "ism_edge.output.floor"))
        tail = [helper.make_node("Max", [USER_OUTPUT, "ism_edge.output.floor"], ["ism_edge.output.p"],
                                 name="ism_edge.output.floor"),
                helper.make_node("Log", ["ism_edge.output.p"], ["logits"], name="ism_edge.output.log")]
    user_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *user_nodes, *tail])
    graph.initializer.extend(consts)
    inits = {t.name for t in graph.initializer}
    kept_inputs = [i for i in graph.input if i.name in inits]  # IR < 4 lists initializers as inputs
    del graph.input[:]
    graph.input.extend([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, c.height, c.width]),
                        *kept_inputs])
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])])
    del graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


# -- the PyTorch side ---------------------------------------------------------------------------


class ContractAdapter(nn.Module):
    """The defense's pixels → the user's contract, in PyTorch (the same ops as :func:`classifier_graph`)."""

    def __init__(self, contract: ClassifierInput) -> None:
        super().__init__()
        c = contract
        self.bgr, self.scale, self.nhwc = c.channel_order == "BGR", float(c.scale), c.layout == "NHWC"
        self.normalise_mean = any(m != 0.0 for m in c.mean)
        self.normalise_std = any(s != 1.0 for s in c.std)
        self.register_buffer("mean", torch.tensor(c.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(c.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bgr:
            x = x[:, [2, 1, 0]]
        if self.scale != 1.0:
            x = x * self.scale
        if self.normalise_mean:
            x = x - self.mean
        if self.normalise_std:
            x = x / self.std
        return x.permute(0, 2, 3, 1) if self.nhwc else x


class ExternalClassifier(nn.Module):
    """A user's classifier as the defense's C: ``x`` (float32 NCHW RGB in [0, 1]) → logits.

    ``graph``: the user's ONNX bytes as stored in the bundle; ``record``: the bundle manifest's
    ``classifier`` entry (origin and input contract). Its parameters never require gradients
    (the classifier is frozen); gradients flow through it to the input. ``factory_module``: the
    PyTorch module a ``package.module:factory`` classifier was exported from, which
    :meth:`trainable_copy` fine-tunes instead of ``onnx2torch``'s conversion.
    """

    def __init__(self, graph: bytes, contract: ClassifierInput, num_classes: int, record: dict[str, Any],
                 factory_module: nn.Module | None = None) -> None:
        super().__init__()
        self.graph, self.contract, self.num_classes, self.record = graph, contract, num_classes, record
        self.adapter = ContractAdapter(contract)
        self.model = to_torch(_onnx().ModelProto.FromString(graph), record.get("origin", {}).get("source", "graph"))
        self.model.requires_grad_(False)
        # a plain attribute, not a submodule: the bundle and the checkpoints hold the graph's weights only
        self.__dict__["factory_module"] = factory_module
        self.eval()

    def train(self, mode: bool = True) -> ExternalClassifier:
        """Always in inference mode: the user's batch norms and dropouts stay as deployed."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(self.model(self.adapter(x)), self.contract)

    def trainable_copy(self) -> TrainableClassifier:
        """A copy whose weights train (``--finetune adversarial``); this classifier is left as it is."""
        source = self.__dict__["factory_module"]
        return TrainableClassifier(copy.deepcopy(source if source is not None else self.model), self.contract,
                                   self.num_classes, self.record)


def _logits(out: torch.Tensor, contract: ClassifierInput) -> torch.Tensor:
    if contract.output == "probabilities":
        out = torch.log(torch.clamp_min(out, PROBABILITY_FLOOR))
    return out


class TrainableClassifier(nn.Module):
    """A trainable copy of a user's classifier, behind the same :class:`ContractAdapter`.

    ``model``: the factory's module or ``onnx2torch``'s conversion; the floating-point constants
    ``onnx2torch`` keeps as buffers (a ``MatMul``'s weight, an ``Add``'s bias: every initializer
    that is not a ``Conv``/``Gemm``/``BatchNormalization`` parameter) become parameters, so that
    every weight of the graph trains, not only those of the layers it recognised; scalars
    (epsilons, fixed factors) and integer shapes stay constants. BatchNorm and dropout layers
    follow :meth:`train`/:meth:`eval` as in any PyTorch model. It has no ``graph``: it is
    exported with :func:`finetuned_classifier` before a bundle holds it.
    """

    def __init__(self, model: nn.Module, contract: ClassifierInput, num_classes: int,
                 record: dict[str, Any]) -> None:
        super().__init__()
        self.contract, self.num_classes, self.record = contract, num_classes, record
        self.adapter = ContractAdapter(contract)
        self.model = model
        for owner in model.modules():
            for name, buf in list(owner.named_buffers(recurse=False)):
                if name.startswith("onnx_initializer_") and buf.is_floating_point() and buf.numel() > 1:
                    delattr(owner, name)
                    owner.register_parameter(name, nn.Parameter(buf.detach().clone()))
        self.model.requires_grad_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(self.model(self.adapter(x)), self.contract)


def to_torch(model: onnx.ModelProto, where: str) -> nn.Module:
    """``onnx2torch``'s conversion of a graph (at opset 17 where it is newer); an operator it cannot
    convert is named in a one-line error."""
    onnx = _onnx()
    o2t = import_onnx2torch()
    model = onnx.ModelProto.FromString(model.SerializeToString())
    # torch.onnx's dynamic-batch exports write Reshape(allowzero=1), which onnx2torch refuses; it differs
    # from allowzero=0 only for a 0 in the target shape, i.e. an empty tensor: never an image batch (the
    # conversion is compared with ONNX Runtime on real images before it is used)
    for node in model.graph.node:
        if node.op_type == "Reshape":
            for attr in node.attribute:
                if attr.name == "allowzero":
                    attr.i = 0
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), TORCH_OPSET)
    if opset > TORCH_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, TORCH_OPSET)
        except Exception:  # noqa: BLE001 - convert at the graph's own opset below
            pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return o2t.convert(model)  # type: ignore[no-any-return]
    except NotImplementedError as e:
        found = re.search(r"operation_type='([^']*)', version=(\d+)", str(e))
        if found is None:
            raise BundleError(f"{where}: onnx2torch cannot convert the graph ({_first_line(e)}), needed for the "
                              "defense's gradients") from None
        raise BundleError(f"{where}: onnx2torch cannot convert its operator {found.group(1)} (opset "
                          f"{found.group(2)}), needed for the defense's gradients: export the model with operators "
                          "onnx2torch supports") from None
    except Exception as e:  # noqa: BLE001 - any failure of the converter is the same refusal
        raise BundleError(f"{where}: onnx2torch cannot convert the graph ({_first_line(e)})") from None


# -- the two origins ----------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_factory(spec: str, weights: Path | None) -> nn.Module:
    """Build ``package.module:factory()`` and load ``weights`` into it (safetensors, or a state dict
    saved with ``torch.save``, read with ``weights_only=True``)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise BundleError(f"--classifier {spec}: pass an .onnx file or package.module:factory")
    if weights is None:
        raise BundleError(f"--classifier {spec} is a PyTorch factory: pass its weights with --weights FILE")
    if not weights.is_file():
        raise BundleError(f"--weights {weights} does not exist")
    import os

    # ``package.module`` as ``python -m`` finds it: from the current directory too (a console script's
    # sys.path does not hold it)
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise BundleError(f"--classifier {spec}: cannot import it ({_first_line(e)}): run from the directory "
                          "that holds the package, or put it on PYTHONPATH") from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    model = factory()
    if not isinstance(model, nn.Module):
        raise BundleError(f"--classifier {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - unpickling, safetensors and key/shape mismatches alike
        raise BundleError(f"--weights {weights} cannot be loaded into {spec} ({_first_line(e)})") from None
    return model.eval()


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence torch.onnx's per-step chatter and its 'torchvision is not installed' warnings.

    Every ONNX export of the project runs inside it (a user's module here, the defense's
    networks in ``engines/export.py``).
    """
    import logging
    import os

    # torch.export prints the graph it could not trace (pages of it) to stderr before it raises;
    # its loggers and torch.onnx's are silenced too. The caller reports failures in one line.
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "torch.fx",
                                                     "torch.fx.experimental.symbolic_shapes", "torch._dynamo")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with (warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull),
              contextlib.redirect_stderr(devnull)):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def module_to_onnx(model: nn.Module, contract: ClassifierInput, where: str) -> bytes:
    """Export a factory's module to ONNX (opset 18, dynamic batch) at the contract's input."""
    h, w = contract.size
    example = torch.rand(2, 3, h, w) if contract.layout == "NCHW" else torch.rand(2, h, w, 3)
    import inspect

    arg = next(iter(inspect.signature(model.forward).parameters))
    try:
        with torch.no_grad(), quiet_exporter():
            program = torch.onnx.export(model, (example,), input_names=["input"], output_names=["output"],
                                        dynamic_shapes={arg: {0: torch.export.Dim("N", min=1)}}, opset_version=18,
                                        dynamo=True, external_data=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - the exporter raises many types
        # torch.export cannot trace data-dependent Python branches, such as those onnx2torch's
        # converters take on a graph's constant shapes (Reshape's `if torch.any(shape == 0)`);
        # the TorchScript exporter traces them as the constants they are.
        return _traced_onnx(model, example, where, _first_line(e))
    if program is None:  # pragma: no cover - the dynamo exporter always returns a program
        raise BundleError(f"{where}: torch.onnx.export returned no program")
    buf = io.BytesIO()
    _onnx().save(program.model_proto, buf)
    return buf.getvalue()


def _traced_onnx(model: nn.Module, example: torch.Tensor, where: str, dynamo_error: str) -> bytes:
    """``model`` exported by torch.onnx's TorchScript tracer (opset 18, dynamic batch)."""
    buf = io.BytesIO()
    try:
        with torch.no_grad(), quiet_exporter():
            torch.onnx.export(model, (example,), buf, input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "N"}, "output": {0: "N"}}, opset_version=18, dynamo=False)
    except Exception as e:  # noqa: BLE001 - the exporter raises many types
        raise BundleError(f"{where}: torch.onnx.export cannot export it (torch.export: {dynamo_error}; "
                          f"TorchScript: {_first_line(e)})") from None
    return buf.getvalue()


def classifier_size(src: ClassifierSource) -> tuple[int, int]:
    """(height, width) of the classifier's input: ``--input-size``, or the graph's static size."""
    if src.is_factory:
        if src.input_size is None:
            raise BundleError(f"--classifier {src.path} is a PyTorch factory: pass --input-size HxW")
        return src.input_size
    return contract_of(read_onnx(Path(src.path)), src, src.path).size


def prepare_classifier(src: ClassifierSource, samples: np.ndarray) -> ExternalClassifier:
    """Read, check and convert the user's classifier; ``samples``: real images (defense pixels,
    float32 NCHW RGB in [0, 1], any size: resized here) the conversion is checked on.

    Every refusal is one :class:`BundleError` line, before anything is written.
    """
    onnx = _onnx()
    module: nn.Module | None = None
    if src.is_factory:
        where = src.path
        module = load_factory(src.path, src.weights)
        if src.input_size is None:
            raise BundleError(f"--classifier {src.path} is a PyTorch factory: pass --input-size HxW")
        contract = ClassifierInput(height=src.input_size[0], width=src.input_size[1], layout=src.layout or "NCHW",
                                   channel_order=src.channel_order, scale=src.scale, mean=src.mean, std=src.std,
                                   output=src.output)
        graph = module_to_onnx(module, contract, where)
        user = onnx.ModelProto.FromString(graph)
        assert src.weights is not None
        origin = {"kind": "module", "source": src.path, "weights": str(src.weights),
                  "sha256": _sha256(src.weights.read_bytes()), "exported_opset": 18}
    else:
        path = Path(src.path)
        where = str(path)
        if src.weights is not None:
            raise BundleError(f"--weights is for a package.module:factory classifier; {path} holds its weights")
        user = read_onnx(path)
        # the graph with any external weight files (torch.onnx's ``.onnx.data``) read in: the bundle
        # keeps one self-contained file; the user's nodes and weights are as they are
        graph = user.SerializeToString()
        contract = contract_of(user, src, where)
        origin = {"kind": "onnx", "source": str(path), "sha256": _sha256(path.read_bytes())}
    x = _resized(samples, contract.size)
    record = {"origin": origin, "input": contract.to_dict()}
    return _checked_classifier(user, graph, contract, record, x, where, factory_module=module)


def _checked_classifier(user: onnx.ModelProto, graph: bytes, contract: ClassifierInput, record: dict[str, Any],
                        x: np.ndarray, where: str, factory_module: nn.Module | None = None) -> ExternalClassifier:
    """``graph`` (the bytes of ``user``) as the frozen classifier, once ONNX Runtime has run it on
    ``x`` (defense pixels at the contract's size) and ``onnx2torch``'s conversion has matched it
    there; ``record`` gets ``num_classes`` and the ``conversion_check``."""
    _, reference = probe(_with_dynamic_batch(user), contract, x, where)
    num_classes = int(reference.shape[1])
    record = {**record, "num_classes": num_classes}
    clf = ExternalClassifier(graph, contract, num_classes, record, factory_module)
    with torch.no_grad():
        ours = clf.model(torch.from_numpy(user_input(x, contract))).numpy()
    err, agree = _difference(ours, reference)
    if not err <= CONVERSION_TOLERANCE:
        raise BundleError(f"{where}: onnx2torch's conversion differs from ONNX Runtime by {err:.2g} (relative; "
                          f"labels agree on {agree:.0%} of {len(x)} images): the defense would be trained around "
                          "another model; report the graph's operators to onnx2torch")
    record["conversion_check"] = {"n": len(x), "max_rel_diff": err, "label_agreement": agree}
    return clf


def _difference(ours: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Max |Δ| relative to the largest |reference| (at least 1), and the share of equal labels."""
    scale = max(float(np.abs(reference).max()), 1.0)
    return float(np.abs(ours - reference).max()) / scale, float((ours.argmax(1) == reference.argmax(1)).mean())


def finetuned_classifier(trained: TrainableClassifier, samples: np.ndarray,
                         entry: dict[str, Any], what: str = "fine-tuned copy") -> ExternalClassifier:
    """The fine-tuned copy exported to ONNX at the user's input contract (the graph still takes the
    user's layout, scale and normalisation) and frozen again, as the bundle's classifier.

    The export is run by ONNX Runtime on ``samples`` (defense pixels, any size) and must match the
    fine-tuned PyTorch module there as closely as the conversion check asks of a user's graph
    (``entry["export_check"]`` records it), and its ``onnx2torch`` conversion must match too.
    ``entry`` is the record's ``finetuned`` entry; the origin (the user's file and its SHA-256)
    is kept. The user's own file is not touched: only the returned classifier holds the new graph.
    ``what`` names the copy in error lines (the distill stage's is the "distilled student").
    """
    onnx = _onnx()
    contract = trained.contract
    where = f"the {what} of {trained.record['origin']['source']}"
    module = trained.model.eval()
    graph = module_to_onnx(module, contract, where)
    exported = onnx.ModelProto.FromString(graph)
    x = _resized(samples, contract.size)
    _, reference = probe(_with_dynamic_batch(exported), contract, x, where)
    with torch.no_grad():
        ours = module(torch.from_numpy(user_input(x, contract))).numpy()
    if reference.shape != ours.shape:
        raise BundleError(f"{where}: its ONNX export outputs {list(reference.shape)}, the module {list(ours.shape)}")
    err, agree = _difference(ours, reference)
    if not err <= CONVERSION_TOLERANCE:
        raise BundleError(f"{where}: its ONNX export differs from the trained PyTorch module by {err:.2g} "
                          f"(relative; labels agree on {agree:.0%} of {len(x)} images): the bundle would hold "
                          "another model than the one fine-tuned; train with --finetune none")
    record = {k: v for k, v in trained.record.items() if k not in ("num_classes", "conversion_check")}
    record["finetuned"] = {**entry, "export_check": {"n": len(x), "max_rel_diff": err, "label_agreement": agree}}
    clf = _checked_classifier(exported, graph, contract, record, x, where)
    if clf.num_classes != trained.num_classes:  # pragma: no cover - the export check compared the shapes
        raise BundleError(f"{where}: its ONNX export has {clf.num_classes} outputs, not {trained.num_classes}")
    return clf


def _resized(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if x.shape[2:] == size:
        return x
    t = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=False)
    return t.clamp(0, 1).numpy()


def from_bundle(graph: bytes, record: dict[str, Any], where: str) -> ExternalClassifier:
    """The classifier of a bundle's ``classifier.onnx`` and manifest record (already checked)."""
    contract = ClassifierInput.from_dict(record["input"])
    num_classes = int(record["num_classes"])
    return ExternalClassifier(graph, contract, num_classes, record)

