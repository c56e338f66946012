"""Plain image folders: ``root/<class_name>/*.{png,jpg,jpeg,bmp}``, classes sorted by name."""

from __future__ import annotations

from pathlib import Path

from ism_edge.errors import DataError
from ism_edge_training.data.images import IMAGE_EXTENSIONS


def _images_in(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
                  and p.is_file())


def _class_dirs(root: Path) -> list[Path]:
    return sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def is_image_folder(root: Path) -> bool:
    """True when some sub-folder of ``root`` holds an image file."""
    return any(_images_in(d) for d in _class_dirs(root))


def list_image_folder(root: Path) -> tuple[tuple[str, ...], list[Path], list[int]]:
    """Class names (sorted sub-folder names), image paths and their labels.

    Every visible sub-folder is a class and must hold at least one image, as in
    torchvision's ``ImageFolder``.
    """
    classes = _class_dirs(root)
    if not classes:
        raise DataError(f"image folder {root} has no class sub-folders: lay it out as {root}/<class_name>/*.png")
    paths: list[Path] = []
    labels: list[int] = []
    for label, d in enumerate(classes):
        images = _images_in(d)
        if not images:
            raise DataError(f"class folder {d} holds no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images: "
                            f"add images or remove the folder")
        paths += images
        labels += [label] * len(images)
    return tuple(d.name for d in classes), paths, labels
