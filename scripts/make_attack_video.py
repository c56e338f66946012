"""Make a test video from real photos in which a known subset of frames is attacked with PGD.

Frames are 640×480 pans over the photos in a folder (a camera-like sequence). In every third
block of ``--block`` frames, each frame is attacked with L∞ PGD against the bundle's deployed
classifier (known-classifier threat model), at ε cycling through ``--eps``. The attack is made in
the model's input space — the frame exactly as ``ism-edge run`` resizes it (area averaging by an
integer factor) — and the perturbation is upsampled back (nearest), so the runtime sees the
adversarial input. The video is written losslessly (FFV1) when OpenCV can, else as MJPG; the
ground truth (which frames are attacked, at which ε) goes to ``truth.json`` next to it.

Usage: python scripts/make_attack_video.py --bundle BUNDLE --photos DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import torch

from ism_edge.preprocess import resize_input
from ism_edge_training.attacks import PGD
from ism_edge_training.bundle import DefenseBundle
from ism_edge_training.defense import attack_surrogate

W, H = 640, 480


def camera_frames(photos: list[np.ndarray], n: int, per_photo: int) -> list[np.ndarray]:
    """A slow pan over each photo (BGR uint8, 640×480), ``per_photo`` frames each."""
    frames = []
    for i in range(n):
        img = photos[(i // per_photo) % len(photos)]
        h, w = img.shape[:2]
        ch, cw = int(min(h, w * 3 / 4) * 0.8), int(min(h, w * 3 / 4) * 0.8 * 4 / 3)
        t = (i % per_photo) / max(per_photo - 1, 1)
        y0, x0 = int((h - ch) * 0.5), int((w - cw) * t)
        frames.append(cv2.resize(img[y0:y0 + ch, x0:x0 + cw], (W, H), interpolation=cv2.INTER_AREA))
    return frames


def open_writer(path: Path, fps: float) -> tuple[cv2.VideoWriter, Path, str]:
    for fourcc, suffix in (("FFV1", ".mkv"), ("MJPG", ".avi")):
        p = path.with_suffix(suffix)
        w = cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*fourcc), fps, (W, H))
        if w.isOpened():
            return w, p, fourcc
        w.release()
    sys.exit(f"error: OpenCV cannot write video to {path} (no FFV1 or MJPG encoder)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--photos", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--frames", type=int, default=90)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--eps", default="8/255,0.1,0.2")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    torch.manual_seed(a.seed)
    bundle = DefenseBundle.load(a.bundle)
    c, h, w = bundle.config.channels, bundle.config.image_size, bundle.config.image_size
    if W % w or H % h:
        sys.exit(f"error: 640x480 frames need a model size dividing them; the bundle takes {w}x{h}")
    paths = sorted(p for p in a.photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        sys.exit(f"error: no photos in {a.photos}")
    photos = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths]
    frames = camera_frames(photos, a.frames, per_photo=max(a.frames // len(photos), 1))
    eps_list = [float(Fraction(e)) for e in a.eps.split(",")]
    model = attack_surrogate(bundle).eval()

    a.out.mkdir(parents=True, exist_ok=True)
    writer, video_path, codec = open_writer(a.out / "camera", a.fps)
    truth: dict[str, object] = {"frames": a.frames, "fps": a.fps, "codec": codec, "attacked": {}, "size": [W, H]}
    worst = 0.0
    deviations: list[float] = []
    for i, frame in enumerate(frames):
        block = i // a.block
        if block % 3 == 1:
            eps = eps_list[(block // 3) % len(eps_list)]
            x = torch.from_numpy(resize_input(frame, (c, h, w), color_order="BGR"))
            with torch.no_grad():
                y = model(x).argmax(1)
            x_adv = PGD(model, eps, steps=a.steps, seed=a.seed + i)(x, y)
            delta = (x_adv - x)[0].numpy().transpose(1, 2, 0)[:, :, ::-1]  # RGB → BGR, HWC
            up = np.repeat(np.repeat(delta, H // h, axis=0), W // w, axis=1)
            frame = np.clip(np.rint(frame.astype(np.float32) + up * 255.0), 0, 255).astype(np.uint8)
            seen = torch.from_numpy(resize_input(frame, (c, h, w), color_order="BGR"))
            worst = max(worst, float((seen - x_adv).abs().max()))
            deviations.append(float((seen - x_adv).abs().mean()))
            truth["attacked"][str(i)] = eps  # type: ignore[index]
        writer.write(frame)
    writer.release()
    truth["video"] = video_path.name
    truth["max_input_deviation"] = worst
    truth["mean_input_deviation"] = float(np.mean(deviations)) if deviations else 0.0
    (a.out / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    n_att = len(truth["attacked"])  # type: ignore[arg-type]
    print(f"video {video_path} ({codec}, {a.frames} frames of {W}x{H}): {n_att} attacked with PGD-{a.steps} "
          f"at eps {a.eps}; the runtime's input differs from the crafted one by "
          f"{truth['mean_input_deviation'] * 255:.2f}/255 "
          f"on average (max {worst * 255:.1f}/255, where the frame saturates)")


if __name__ == "__main__":
    main()
