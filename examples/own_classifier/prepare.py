"""A stand-in for your own model and data, for the README's "Protect your own model" commands.

Writes, under OUT (default ``own-model/``):

* ``data/<class>/*.png``: 60 CIFAR-10 sample images of each of three classes (from the
  committed ``data/samples/cifar10/train.npz``), the usual class-per-subfolder layout;
* ``test/<class>/*.png``: 40 held-out CIFAR-10 test images of each class (for ``ism-edge evaluate``);
* ``classes.txt``: the model's output order (not the folders' sorted order);
* ``model.onnx``: a small ResNet (residual blocks, BatchNorm, global average pooling) for
  48×48 RGB inputs normalised with ImageNet's mean and std outside the graph, trained for a few
  seconds and exported with ``torch.onnx`` — the kind of file a team brings.

Usage: ``python examples/own_classifier/prepare.py [OUT]`` (needs the ``train`` extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
CLASSES = {0: "airplane", 1: "automobile", 7: "horse"}  # CIFAR-10 label → folder name
ORDER = ("horse", "airplane", "automobile")  # the model's outputs
MEAN, STD, SIZE, PER_CLASS, TEST_PER_CLASS = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 48, 60, 40


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def tiny_resnet(classes: int = 3, width: int = 16) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         Residual(width), nn.MaxPool2d(2), Residual(width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, classes))


def main(out: Path) -> None:
    with np.load(ROOT / "data" / "samples" / "cifar10" / "train.npz") as z:
        x, y = z["x"], z["y"]
    images, labels = [], []
    for label, name in CLASSES.items():
        folder = out / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(x[y == label][:PER_CLASS]):
            cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            images.append(cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA))
            labels.append(ORDER.index(name))
    with np.load(ROOT / "data" / "samples" / "cifar10" / "test.npz") as z:
        for label, name in CLASSES.items():
            folder = out / "test" / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(z["x"][z["y"] == label][:TEST_PER_CLASS]):
                cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    (out / "classes.txt").write_text("\n".join(ORDER) + "\n")
    inputs = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    inputs = (inputs - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    targets = torch.tensor(labels)
    torch.manual_seed(0)
    model = tiny_resnet()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(12):
        for idx in torch.randperm(len(inputs)).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(inputs[idx]), targets[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(inputs).argmax(1) == targets).float().mean())
    # A dynamic batch axis: the runtime batches frames and tiles (nn.Flatten would bake a fixed batch in).
    torch.onnx.export(model, (torch.rand(2, 3, SIZE, SIZE),), str(out / "model.onnx"), dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("N", min=1)},), external_data=False)
    print(f"wrote {out}/model.onnx (training accuracy {acc:.1%}), {out}/data/ ({len(targets)} images) "
          f"{out}/test/ and {out}/classes.txt")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "own-model"))
