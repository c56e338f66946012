"""The input contract of a user's own classifier (``ism-edge train --classifier``).

The defense's networks (the mapping network M, the perturbation classifier P) and the runtime's
preprocessing work on one kind of image: float32 NCHW RGB pixels in [0, 1] at the model's input
size. A classifier brought by its user expects its own kind: another layout (NHWC), colour order
(BGR), pixel scale ([0, 255]) and mean/std normalisation. :class:`ClassifierInput` records that
contract; the conversion from the defense's pixels to it is part of the classifier's graph
(``ism_edge_training.models.external``), so PyTorch, ONNX Runtime and TensorRT compute the same thing and
the runtime's preprocessing stays the same for every bundle (resize to ``height`` × ``width``, RGB,
[0, 1]).

The contract is recorded in the bundle's and the engine directory's manifests; this module reads
and checks it (torch-free: the runtime reports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ism_edge import _checks as check
from ism_edge.manifest import MAX_SIDE

LAYOUTS = ("NCHW", "NHWC")
CHANNEL_ORDERS = ("RGB", "BGR")
SCALES = (1.0, 255.0)
OUTPUTS = ("logits", "probabilities")
ORIGIN_KINDS = ("onnx", "module")
#: How a bundle's copy of a user's classifier was fine-tuned (``ism-edge train --finetune``).
FINETUNED_METHODS = ("adversarial",)
#: How the deployed student was distilled from that copy (``--finetune adversarial`` with distillation;
#: defensive distillation is refused with ``--finetune``: it would change the scale of the user's logits).
DISTILLED_METHODS = ("ard",)


@dataclass(frozen=True)
class ClassifierInput:
    """What a user's classifier takes and gives.

    ``height``/``width``: its input size in pixels; ``layout``: ``NCHW`` or ``NHWC``;
    ``channel_order``: ``RGB`` or ``BGR``; ``scale``: 1 (pixels in [0, 1]) or 255 (pixels in
    [0, 255]); ``mean``/``std``: per-channel normalisation applied after scaling, in the model's
    channel order (``(x * scale - mean) / std``; 0 and 1 for none); ``output``: ``logits`` or
    ``probabilities`` (their logarithm then serves as logits: softmax(log p) = p).
    """

    height: int
    width: int
    layout: str = "NCHW"
    channel_order: str = "RGB"
    scale: float = 1.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    output: str = "logits"

    def __post_init__(self) -> None:
        try:
            self.check()
        except check.FieldError as e:
            raise ValueError(str(e)) from None

    def check(self, name: str = "input") -> None:
        """Raise :class:`~ism_edge._checks.FieldError` naming the field unless every field is in range."""
        check.integer(self.height, f"{name}.height", 1, MAX_SIDE)
        check.integer(self.width, f"{name}.width", 1, MAX_SIDE)
        check.choice(self.layout, f"{name}.layout", LAYOUTS)
        check.choice(self.channel_order, f"{name}.channel_order", CHANNEL_ORDERS)
        if check.number(self.scale, f"{name}.scale", 0.0, 1e4) not in SCALES:
            raise check.FieldError(f"{name}.scale must be 1 or 255, got {check.show(self.scale)}")
        for key, values, lo in (("mean", self.mean, -1e4), ("std", self.std, 1e-6)):
            if len(check.array(list(values), f"{name}.{key}", max_len=3)) != 3:
                raise check.FieldError(f"{name}.{key} must list 3 numbers (one per channel), got {list(values)}")
            for i, v in enumerate(values):
                check.number(v, f"{name}.{key}[{i}]", lo, 1e4)
        check.choice(self.output, f"{name}.output", OUTPUTS)

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    def to_dict(self) -> dict[str, Any]:
        return {"height": self.height, "width": self.width, "layout": self.layout,
                "channel_order": self.channel_order, "scale": self.scale, "mean": list(self.mean),
                "std": list(self.std), "output": self.output}

    @classmethod
    def from_dict(cls, d: Any, name: str = "input") -> ClassifierInput:
        """Read a manifest's record; raises :class:`~ism_edge._checks.FieldError` naming the bad field."""
        d = check.obj(d, name)
        mean = check.array(check.require(d, "mean", f"{name}.mean"), f"{name}.mean", max_len=3)
        std = check.array(check.require(d, "std", f"{name}.std"), f"{name}.std", max_len=3)
        try:
            return cls(height=check.require(d, "height", f"{name}.height"),
                       width=check.require(d, "width", f"{name}.width"),
                       layout=check.require(d, "layout", f"{name}.layout"),
                       channel_order=check.require(d, "channel_order", f"{name}.channel_order"),
                       scale=check.require(d, "scale", f"{name}.scale"),
                       mean=tuple(mean), std=tuple(std),  # type: ignore[arg-type]
                       output=check.require(d, "output", f"{name}.output"))
        except ValueError as e:
            raise check.FieldError(str(e)) from None


def check_classifier_record(record: Any, name: str = "classifier") -> dict[str, Any]:
    """Check a manifest's ``classifier`` record (a user's classifier: its origin and input contract).

    ``{"origin": {"kind": "onnx" | "module", "source": text, "sha256": hex, ...}, "input": {...}}``,
    and ``"finetuned": {"method": "adversarial", "epochs": n, ...}`` when the graph is a fine-tuned
    copy of the user's classifier (the origin still names the user's file), with ``"distill":
    {"method": "ard", "epochs": n, ...}`` in it when the graph is the student distilled from that
    copy; returns it. An empty record means the bundle's own classifier.
    """
    record = check.obj(record, name)
    if not record:
        return record
    origin = check.obj(check.require(record, "origin", f"{name}.origin"), f"{name}.origin")
    check.choice(check.require(origin, "kind", f"{name}.origin.kind"), f"{name}.origin.kind", ORIGIN_KINDS)
    check.text(check.require(origin, "source", f"{name}.origin.source"), f"{name}.origin.source", max_len=4096)
    check.sha256(check.require(origin, "sha256", f"{name}.origin.sha256"), f"{name}.origin.sha256")
    if "weights" in origin:
        check.text(origin["weights"], f"{name}.origin.weights", max_len=4096)
    ClassifierInput.from_dict(check.require(record, "input", f"{name}.input"), f"{name}.input")
    if "finetuned" in record:
        tuned = check.obj(record["finetuned"], f"{name}.finetuned")
        check.choice(check.require(tuned, "method", f"{name}.finetuned.method"), f"{name}.finetuned.method",
                     FINETUNED_METHODS)
        check.integer(check.require(tuned, "epochs", f"{name}.finetuned.epochs"), f"{name}.finetuned.epochs", 0,
                      1_000_000)
        if "distill" in tuned:
            where = f"{name}.finetuned.distill"
            distilled = check.obj(tuned["distill"], where)
            check.choice(check.require(distilled, "method", f"{where}.method"), f"{where}.method",
                         DISTILLED_METHODS)
            check.integer(check.require(distilled, "epochs", f"{where}.epochs"), f"{where}.epochs", 0, 1_000_000)
    return record
