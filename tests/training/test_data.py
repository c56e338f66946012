"""Data set loaders: real CIFAR-10 pixels round-tripped through both official formats, .npz parts,
the committed CelebA sample, image folders, stratified selection and torch batching."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from ism_edge.errors import DataError
from ism_edge_training.data import (
    CIFAR10_CLASSES,
    ImageArrays,
    declared_classes,
    detect_kind,
    load_dataset,
    stratified_indices,
)
from tests.conftest import CIFAR_TEST, CIFAR_TRAIN, ROOT, SAMPLES

CELEBA = SAMPLES / "celeba"


# ---------------------------------------------------------------------------------------------
# Writers for the two official CIFAR-10 formats
# ---------------------------------------------------------------------------------------------
class _Python2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Protocol-2 pickler that writes like Python 2's cPickle, as the official batches were made:
    strings as py2 ``str`` (SHORT_BINSTRING/BINSTRING, no ``_codecs.encode``) and numpy's
    reconstructor under its Python-2-era module ``numpy.core.multiarray``."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _save_py2_str(self, obj: bytes | str) -> None:
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        n = len(raw)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str

    def save_global(self, obj: object, name: str | None = None) -> None:
        name = name or obj.__qualname__  # type: ignore[attr-defined]
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


def _py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    _Python2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _planar(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), 3072))


def _official_batches(train: dict, test: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Sample images placed in their official batch (train index = (batch - 1) * 10000 + row)."""
    order = np.argsort(train["index"])
    x, y, idx = train["x"][order], train["y"][order], train["index"][order]
    out = {f"data_batch_{b}": (x[idx // 10000 == b - 1], y[idx // 10000 == b - 1]) for b in range(1, 6)}
    out["test_batch"] = (test["x"], test["y"])
    return out


def write_cifar_pickle(d: Path, batches: dict[str, tuple[np.ndarray, np.ndarray]],
                       label_names: tuple[str, ...] | None = CIFAR10_CLASSES) -> None:
    d.mkdir(parents=True)
    for name, (x, y) in batches.items():
        label = b"testing batch 1 of 1" if name == "test_batch" else f"training batch {name[-1]} of 5".encode()
        batch = {b"batch_label": label, b"labels": [int(v) for v in y], b"data": _planar(x),
                 b"filenames": [f"{name}_{i:05d}.png".encode() for i in range(len(y))]}
        (d / name).write_bytes(_py2_pickle(batch))
    if label_names is not None:
        meta = {b"num_cases_per_batch": 10000, b"label_names": [n.encode() for n in label_names], b"num_vis": 3072}
        (d / "batches.meta").write_bytes(_py2_pickle(meta))


def write_cifar_binary(d: Path, batches: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    d.mkdir(parents=True)
    for name, (x, y) in batches.items():
        records = np.concatenate([y.astype(np.uint8)[:, None], _planar(x)], axis=1)
        (d / f"{name}.bin").write_bytes(records.tobytes())
    (d / "batches.meta.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n\n")


@pytest.fixture(scope="module")
def npz_train() -> dict[str, np.ndarray]:
    with np.load(CIFAR_TRAIN) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def npz_test() -> dict[str, np.ndarray]:
    with np.load(CIFAR_TEST) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def batches(npz_train: dict, npz_test: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = _official_batches(npz_train, npz_test)
    assert all(len(y) > 0 for _, y in out.values())
    return out


@pytest.fixture(scope="module")
def pickle_root(tmp_path_factory: pytest.TempPathFactory, batches: dict) -> Path:
    root = tmp_path_factory.mktemp("cifar_py")
    write_cifar_pickle(root / "cifar-10-batches-py", batches)
    head = (root / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    assert head.startswith(b"\x80\x02}") and b"cnumpy.core.multiarray\n_reconstruct\n" in head
    assert b"_codecs" not in head and b"\x8c" not in head[:64]
    return root


@pytest.fixture(scope="module")
def binary_root(tmp_path_factory: pytest.TempPathFactory, batches: dict) -> Path:
    root = tmp_path_factory.mktemp("cifar_bin")
    write_cifar_binary(root / "cifar-10-batches-bin", batches)
    return root


def _expected(batches: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = [f"data_batch_{b}" for b in range(1, 6)] if split == "train" else ["test_batch"]
    return np.concatenate([batches[n][0] for n in names]), np.concatenate([batches[n][1] for n in names])


# ---------------------------------------------------------------------------------------------
# CIFAR-10 pickle and binary batches
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["pickle", "binary"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar_official_formats_load_pixel_exact(fmt: str, split: str, pickle_root: Path, binary_root: Path,
                                                 batches: dict) -> None:
    root = pickle_root if fmt == "pickle" else binary_root
    sub = root / ("cifar-10-batches-py" if fmt == "pickle" else "cifar-10-batches-bin")
    x, y = _expected(batches, split)
    for path in (root, sub):
        assert detect_kind(path) == f"cifar10-{fmt}"
        a = load_dataset([path], split=split)
        assert a.x.dtype == np.uint8 and a.x.shape == (len(y), 32, 32, 3)
        np.testing.assert_array_equal(a.x, x)
        np.testing.assert_array_equal(a.y, y)
        assert a.y.dtype == np.int64
        assert a.class_names == CIFAR10_CLASSES
        assert a.exact is not None and a.exact.all()
        assert a.provenance["kind"] == f"cifar10-{fmt}" and a.provenance["split"] == split
        assert a.provenance["n"] == len(y)
        first = sub / ("test_batch" if split == "test" else "data_batch_1")
        first = first.with_name(first.name + (".bin" if fmt == "binary" else ""))
        assert a.provenance["files"][str(first)] == hashlib.sha256(first.read_bytes()).hexdigest()
        json.dumps(a.provenance)


def test_cifar_planar_layout_matches_published_values(pickle_root: Path) -> None:
    """Official test images 0-3 have labels 3, 8, 8, 0; image 0's red channel starts 158, 159, 165, 166."""
    a = load_dataset([pickle_root], split="test")
    assert a.y[:4].tolist() == [3, 8, 8, 0]
    assert a.x[0, 0, :4, 0].tolist() == [158, 159, 165, 166]


def test_cifar_class_names_from_meta_or_standard(tmp_path: Path, batches: dict) -> None:
    custom = tuple(f"label{i}" for i in range(10))
    write_cifar_pickle(tmp_path / "named", {"test_batch": batches["test_batch"]}, custom)
    assert load_dataset([tmp_path / "named"], split="test").class_names == custom
    write_cifar_pickle(tmp_path / "bare", {"test_batch": batches["test_batch"]}, None)
    assert load_dataset([tmp_path / "bare"], split="test").class_names == CIFAR10_CLASSES


def test_cifar_pickle_truncated_raises(tmp_path: Path, pickle_root: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    shutil.copytree(pickle_root / "cifar-10-batches-py", d)
    f = d / "data_batch_2"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(DataError, match="data_batch_2") as e:
        load_dataset([tmp_path], split="train")
    assert "\n" not in str(e.value)
    assert len(load_dataset([tmp_path], split="test")) == 1017


def test_cifar_pickle_refuses_code(tmp_path: Path, batches: dict) -> None:
    write_cifar_pickle(tmp_path / "d", {"test_batch": batches["test_batch"]})
    marker = tmp_path / "pwned"
    (tmp_path / "d" / "test_batch").write_bytes(pickle.dumps(_Evil(str(marker)), protocol=2))
    with pytest.raises(DataError, match="test_batch"):
        load_dataset([tmp_path / "d"], split="test")
    assert not marker.exists()


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.path,))


def test_cifar_missing_batch_and_bad_split(tmp_path: Path, pickle_root: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    shutil.copytree(pickle_root / "cifar-10-batches-py", d)
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset([d], split="train")
    with pytest.raises(DataError, match="'valid'.*train.*test"):
        load_dataset([d], split="valid")


def test_cifar_binary_bad_size_raises(tmp_path: Path, binary_root: Path) -> None:
    d = tmp_path / "cifar-10-batches-bin"
    shutil.copytree(binary_root / "cifar-10-batches-bin", d)
    f = d / "test_batch.bin"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"test_batch\.bin.*3073"):
        load_dataset([tmp_path], split="test")


# ---------------------------------------------------------------------------------------------
# .npz
# ---------------------------------------------------------------------------------------------
def test_npz_single(npz_train: dict) -> None:
    a = load_dataset([CIFAR_TRAIN])
    np.testing.assert_array_equal(a.x, npz_train["x"])
    np.testing.assert_array_equal(a.y, npz_train["y"])
    assert a.class_names == CIFAR10_CLASSES and a.exact is None
    assert a.provenance["files"] == {str(CIFAR_TRAIN): hashlib.sha256(CIFAR_TRAIN.read_bytes()).hexdigest()}
    assert len(load_dataset(str(CIFAR_TEST), exact_only=True)) == 1017  # no `exact` array: all exact


def test_npz_parts_concatenate_in_order_and_exact_only(tmp_path: Path, npz_train: dict) -> None:
    x, y = npz_train["x"], npz_train["y"]
    rng = np.random.default_rng(1)
    exact = rng.random(len(y)) < 0.3
    cuts = [0, 700, 1300, len(y)]
    paths = []
    for i in range(3):
        s = slice(cuts[i], cuts[i + 1])
        extra = {} if i == 1 else {"exact": exact[s]}  # the middle part has no `exact`: all exact
        paths.append(tmp_path / f"part{i + 1}of3.npz")
        np.savez_compressed(paths[-1], x=x[s], y=y[s], index=npz_train["index"][s], **extra)
    full_exact = exact.copy()
    full_exact[700:1300] = True
    a = load_dataset(paths)
    np.testing.assert_array_equal(a.x, x)
    np.testing.assert_array_equal(a.y, y)
    np.testing.assert_array_equal(a.exact, full_exact)
    assert a.provenance["paths"] == [str(p) for p in paths]
    e = load_dataset(paths, exact_only=True)
    np.testing.assert_array_equal(e.x, x[full_exact])
    np.testing.assert_array_equal(e.y, y[full_exact])
    assert e.exact is not None and e.exact.all() and e.provenance["n_exact"] == full_exact.sum()


def test_npz_class_names_and_resize(tmp_path: Path, npz_test: dict) -> None:
    p = tmp_path / "named.npz"
    np.savez(p, x=npz_test["x"][:20], y=npz_test["y"][:20], class_names=np.array([f"k{i}" for i in range(10)]))
    a = load_dataset([p], image_size=16)
    assert a.class_names == tuple(f"k{i}" for i in range(10))
    assert a.x.shape == (20, 16, 16, 3) and a.provenance["image_size"] == 16
    np.testing.assert_array_equal(a.x[3], cv2.resize(npz_test["x"][3], (16, 16), interpolation=cv2.INTER_AREA))


def test_npz_exact_only_leaving_nothing_raises(tmp_path: Path, npz_test: dict) -> None:
    p = tmp_path / "lossy.npz"
    np.savez(p, x=npz_test["x"][:5], y=npz_test["y"][:5], exact=np.zeros(5, bool))
    assert len(load_dataset([p])) == 5
    with pytest.raises(DataError, match="lossy.npz.*exact_only"):
        load_dataset([p], exact_only=True)


@pytest.mark.parametrize("arrays, match", [
    ({"x": "ok"}, "lacks array.*y"),
    ({"x": "float", "y": "ok"}, "x is float32"),
    ({"x": "3d", "y": "ok"}, "x is uint8 \\(4, 32, 96\\)"),
    ({"x": "ok", "y": "short"}, "y is int64 \\(3,\\)"),
    ({"x": "ok", "y": "ok", "exact": "int"}, "exact is int64"),
])
def test_npz_bad_contents_raise(tmp_path: Path, npz_test: dict, arrays: dict, match: str) -> None:
    x, y = npz_test["x"][:4], npz_test["y"][:4]
    values = {"ok": None, "float": x.astype(np.float32), "3d": x.reshape(4, 32, 96), "short": y[:3],
              "int": np.ones(4, np.int64)}
    data = {k: (x if k == "x" else y) if values[v] is None else values[v] for k, v in arrays.items()}
    p = tmp_path / "bad.npz"
    np.savez(p, **data)
    with pytest.raises(DataError, match=match) as e:
        load_dataset([p])
    assert str(p) in str(e.value)


def test_npz_not_an_archive_and_mismatched_parts(tmp_path: Path, npz_test: dict) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(DataError, match="junk.npz"):
        load_dataset([junk])
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, x=npz_test["x"][:4], y=npz_test["y"][:4])
    np.savez(b, x=npz_test["x"][:4, :16, :16], y=npz_test["y"][:4])
    with pytest.raises(DataError, match="b.npz.*must match"):
        load_dataset([a, b])


def test_npz_that_is_not_a_zip_says_what_it_is(tmp_path: Path, npz_test: dict) -> None:
    text = tmp_path / "notes.npz"
    text.write_text("x,y\n1,2\n")
    with pytest.raises(DataError) as e:
        load_dataset([text])
    assert "notes.npz is not a valid .npz archive (an .npz is a zip file; this is a text file)" in str(e.value)
    assert "pickled" not in str(e.value)
    npy = tmp_path / "x.npz"
    with open(npy, "wb") as f:
        np.save(f, npz_test["x"][:2])
    with pytest.raises(DataError, match="this is a single .npy array"):
        load_dataset([npy])
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(DataError, match="this is an empty file"):
        load_dataset([tmp_path / "empty.npz"])


def _stray_label(tmp_path: Path, npz_test: dict) -> Path:
    """A CIFAR-10 sample whose fourth label is 57 (ten classes otherwise)."""
    y = npz_test["y"][:200].copy()
    y[3] = 57
    p = tmp_path / "stray.npz"
    np.savez(p, x=npz_test["x"][:200], y=y)
    return p


def test_a_label_outside_the_class_list_is_refused(tmp_path: Path, npz_test: dict) -> None:
    p = _stray_label(tmp_path, npz_test)
    with pytest.raises(DataError) as e:
        load_dataset([p])
    message = str(e.value)
    assert f"{p}: labels reach 57, so 58 classes, but 47 of them (10, 11, 12, …) have no image" in message
    assert "--num-classes 58" in message
    with pytest.raises(DataError, match="labels reach 57 but 10 classes were declared"):
        load_dataset([p], num_classes=10)
    with declared_classes(num_classes=10), pytest.raises(DataError, match="10 classes were declared"):
        load_dataset([p])
    a = load_dataset([p], num_classes=58)
    assert a.num_classes == 58 and a.class_names[57] == "class_57"


def test_declared_classes_name_an_npz_or_must_match(tmp_path: Path, npz_test: dict) -> None:
    p = tmp_path / "plain.npz"
    np.savez(p, x=npz_test["x"][:50], y=npz_test["y"][:50])
    names = [f"k{i}" for i in range(10)]
    assert load_dataset([p], class_names=names).class_names == tuple(names)
    assert load_dataset([p], num_classes=10).class_names == CIFAR10_CLASSES
    with pytest.raises(DataError, match="3 class names were declared for 10 classes"):
        load_dataset([p], num_classes=10, class_names=["a", "b", "c"])
    named = tmp_path / "named.npz"
    np.savez(named, x=npz_test["x"][:50], y=npz_test["y"][:50], class_names=np.array(names))
    with pytest.raises(DataError, match="not the declared"):
        load_dataset([named], num_classes=12)
    with declared_classes(class_names=names):
        assert load_dataset([named]).class_names == tuple(names)


def test_declared_classes_are_checked_for_every_layout(tmp_path: Path, npz_test: dict) -> None:
    root = tmp_path / "folder"
    for i, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        cv2.imwrite(str(root / name / f"{i}.png"), npz_test["x"][i])
    assert load_dataset([root], num_classes=2).class_names == ("cat", "dog")
    with pytest.raises(DataError, match=r"\(folder\) has the 2 classes \['cat', 'dog'\]…, not the declared"):
        load_dataset([root], num_classes=3)
    with pytest.raises(DataError, match="not the declared"):
        load_dataset([root], class_names=["dog", "cow"])
    # The folders' names in another order (--classes: a model's output order) relabel the images.
    reordered = load_dataset([root], class_names=["dog", "cat"])
    assert reordered.class_names == ("dog", "cat") and list(reordered.y) == [1, 0]


# ---------------------------------------------------------------------------------------------
# CelebA (committed sample)
# ---------------------------------------------------------------------------------------------
def _attr_table() -> tuple[list[str], list[str], np.ndarray]:
    lines = (CELEBA / "list_attr_celeba.txt").read_text().splitlines()
    names = lines[1].split()
    rows = [line.split() for line in lines[2:] if line.strip()]
    return names, [r[0] for r in rows], np.array([r[1:] for r in rows], dtype=int)


def test_celeba_sample_labels_and_shapes() -> None:
    names, files, values = _attr_table()
    assert detect_kind(CELEBA) == "celeba"
    a = load_dataset([CELEBA], attribute="Smiling", image_size=32)
    assert a.x.shape == (len(files), 32, 32, 3) and a.x.dtype == np.uint8
    np.testing.assert_array_equal(a.y, (values[:, names.index("Smiling")] == 1).astype(np.int64))
    assert a.class_names == ("not_Smiling", "Smiling")
    assert a.class_counts().tolist() == [48, 48]
    male = load_dataset([CELEBA], attribute="male", image_size=8)  # case-insensitive
    assert male.class_names == ("not_Male", "Male")
    np.testing.assert_array_equal(male.y, (values[:, names.index("Male")] == 1).astype(np.int64))
    assert a.provenance["attribute"] == "Smiling" and a.provenance["split"] == "train"
    assert a.provenance["n_image_files"] == 96 and len(a.provenance["images_sha256"]) == 64


def test_celeba_centre_crop_and_resize() -> None:
    a = load_dataset([CELEBA], split="all")
    assert a.x.shape[1:] == (64, 64, 3) and a.provenance["image_size"] == 64
    _, files, _ = _attr_table()
    bgr = cv2.imread(str(CELEBA / "img_align_celeba" / files[0]))
    assert bgr.shape == (218, 178, 3)
    want = cv2.resize(cv2.cvtColor(bgr[20:198], cv2.COLOR_BGR2RGB), (64, 64), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(a.x[0], want)


def test_celeba_splits_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'valid'"):  # the sample holds train images only
        load_dataset([CELEBA], split="valid")
    with pytest.raises(DataError, match="'val'.*train, valid, test, all"):
        load_dataset([CELEBA], split="val")
    d = tmp_path / "celeba"
    shutil.copytree(CELEBA, d)
    _, files, _ = _attr_table()
    (d / "img_align_celeba" / files[5]).unlink()
    a = load_dataset([d], image_size=16)
    assert len(a) == 95 and a.provenance["skipped_without_image"] == 1
    (d / "list_eval_partition.txt").unlink()
    with pytest.raises(DataError, match="list_eval_partition.txt.*'all'"):
        load_dataset([d], split="train")
    assert len(load_dataset([d], split="all", image_size=16)) == 95


def test_celeba_official_download_layout(tmp_path: Path) -> None:
    (tmp_path / "Anno").mkdir()
    (tmp_path / "Eval").mkdir()
    (tmp_path / "Img").mkdir()
    shutil.copy(CELEBA / "list_attr_celeba.txt", tmp_path / "Anno")
    shutil.copy(CELEBA / "list_eval_partition.txt", tmp_path / "Eval")
    os.symlink(CELEBA / "img_align_celeba", tmp_path / "Img" / "img_align_celeba")
    a = load_dataset([tmp_path], image_size=16, limit=10)
    assert len(a) == 10 and a.class_counts().tolist() == [5, 5]


def test_celeba_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'Smiles'.*list_attr_celeba.txt.*Smiling.*40 in all"):
        load_dataset([CELEBA], attribute="Smiles")
    d = tmp_path / "celeba"
    shutil.copytree(CELEBA, d)
    _, files, _ = _attr_table()
    bad = d / "img_align_celeba" / files[2]
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=files[2]):
        load_dataset([d])
    attr = d / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    attr.write_text("\n".join(["97", *lines[1:]]) + "\n")
    with pytest.raises(DataError, match="list_attr_celeba.txt says it lists 97 images"):
        load_dataset([d])
    attr.write_text("\n".join([*lines[:3], lines[3] + " 1", *lines[4:]]) + "\n")
    with pytest.raises(DataError, match="list_attr_celeba.txt line 4"):
        load_dataset([d])


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------
def _write_folder(root: Path, x: np.ndarray, y: np.ndarray, names: dict[int, str], ext: str = ".png") -> None:
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        d = root / names[int(label)]
        d.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(d / f"{i:04d}{ext}"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def test_image_folder_lossless_round_trip(tmp_path: Path, npz_test: dict) -> None:
    x, y = npz_test["x"][:200], npz_test["y"][:200]
    keep = np.isin(y, [3, 0])
    x, y = x[keep], y[keep]
    _write_folder(tmp_path, x, y, {3: "cat", 0: "airplane"})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    assert detect_kind(tmp_path) == "folder"
    a = load_dataset([tmp_path])
    assert a.class_names == ("airplane", "cat")
    np.testing.assert_array_equal(a.x, np.concatenate([x[y == 0], x[y == 3]]))
    np.testing.assert_array_equal(a.y, np.repeat([0, 1], [(y == 0).sum(), (y == 3).sum()]))
    assert a.provenance["kind"] == "folder" and a.provenance["split"] is None
    b = load_dataset([tmp_path], image_size=8)
    assert b.x.shape == (len(a), 8, 8, 3)
    np.testing.assert_array_equal(b.x[0], cv2.resize(a.x[0], (8, 8), interpolation=cv2.INTER_AREA))


def test_image_folder_accepts_bmp_and_jpeg(tmp_path: Path, npz_test: dict) -> None:
    x = npz_test["x"][:2]
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    assert cv2.imwrite(str(tmp_path / "a" / "one.bmp"), cv2.cvtColor(x[0], cv2.COLOR_RGB2BGR))
    assert cv2.imwrite(str(tmp_path / "b" / "two.JPG"), cv2.cvtColor(x[1], cv2.COLOR_RGB2BGR),
                       [cv2.IMWRITE_JPEG_QUALITY, 95])
    a = load_dataset([tmp_path])
    assert a.y.tolist() == [0, 1]
    np.testing.assert_array_equal(a.x[0], x[0])
    assert np.abs(a.x[1].astype(int) - x[1]).mean() < 4


def test_image_folder_errors(tmp_path: Path, npz_test: dict) -> None:
    x, y = npz_test["x"][:6], npz_test["y"][:6]
    _write_folder(tmp_path, x, y, {int(v): f"c{int(v)}" for v in y})
    odd = tmp_path / "zzz" / "big.png"
    odd.parent.mkdir()
    cv2.imwrite(str(odd), np.zeros((40, 30, 3), np.uint8))
    with pytest.raises(DataError, match="big.png is 30x40.*image size"):
        load_dataset([tmp_path])
    assert load_dataset([tmp_path], image_size=32).x.shape == (7, 32, 32, 3)
    (tmp_path / "zzz" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match="broken.jpg"):
        load_dataset([tmp_path], image_size=32)
    (tmp_path / "zzz" / "broken.jpg").unlink()
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class holds no"):
        load_dataset([tmp_path], image_size=32)


# ---------------------------------------------------------------------------------------------
# Paths, layouts, kinds
# ---------------------------------------------------------------------------------------------
def test_path_and_layout_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=re.escape(f"dataset path {missing} does not exist")):
        load_dataset([missing])
    with pytest.raises(DataError, match=re.escape(str(tmp_path)) + ".*accepted layouts"):
        load_dataset([tmp_path])
    txt = tmp_path / "data.csv"
    txt.write_text("1,2\n")
    with pytest.raises(DataError, match="data.csv.*accepted layouts"):
        detect_kind(txt)
    with pytest.raises(DataError, match="directory of .npz files: pass the .npz file"):
        load_dataset([CIFAR_TEST.parent])
    with pytest.raises(DataError, match="unknown data set kind 'mnist'"):
        load_dataset([CIFAR_TEST], kind="mnist")
    with pytest.raises(DataError, match="only .npz parts can be combined"):
        load_dataset([CELEBA, CELEBA])
    with pytest.raises(DataError, match="different layouts"):
        load_dataset([CIFAR_TEST, CELEBA])
    with pytest.raises(DataError, match="limit must be a positive"):
        load_dataset([CIFAR_TEST], limit=0)


# ---------------------------------------------------------------------------------------------
# Stratified selection: split, subset, limit
# ---------------------------------------------------------------------------------------------
def _tagged(y: np.ndarray) -> ImageArrays:
    """Arrays whose pixel (0, 0) encodes each image's position, so selections can be traced."""
    x = np.zeros((len(y), 4, 4, 3), np.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(len(y)) % 256, np.arange(len(y)) // 256
    return ImageArrays(x, y, tuple(f"c{i}" for i in range(int(y.max()) + 1)), {"kind": "test", "paths": []},
                       exact=np.arange(len(y)) % 3 == 0)


def _positions(a: ImageArrays) -> np.ndarray:
    return a.x[:, 0, 0, 0].astype(int) + 256 * a.x[:, 0, 0, 1].astype(int)


def test_split_is_stratified_deterministic_partition() -> None:
    y = np.random.default_rng(0).choice(4, size=1001, p=[0.5, 0.3, 0.15, 0.05])
    a = _tagged(y)
    rest, held = a.split(0.2, seed=3)
    pr, ph = _positions(rest), _positions(held)
    assert len(held) == round(0.2 * 1001) and len(rest) + len(held) == 1001
    assert np.array_equal(np.sort(np.concatenate([pr, ph])), np.arange(1001))
    assert np.all(np.diff(pr) > 0) and np.all(np.diff(ph) > 0)
    assert np.all(np.abs(held.class_counts() - 0.2 * a.class_counts()) <= 1)
    np.testing.assert_array_equal(held.y, y[ph])
    np.testing.assert_array_equal(held.exact, ph % 3 == 0)
    assert np.array_equal(_positions(a.split(0.2, seed=3)[1]), ph)
    assert not np.array_equal(_positions(a.split(0.2, seed=4)[1]), ph)
    assert held.provenance["selection"][-1] == {"op": "split", "fraction": 0.2, "seed": 3, "part": "held_out"}
    assert held.provenance["n"] == len(held)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(DataError, match="between 0 and 1"):
            a.split(bad)
    with pytest.raises(DataError, match="empty"):
        a.split(0.0001)


def test_subset_by_indices_and_mask() -> None:
    a = _tagged(np.arange(50) % 5)
    s = a.subset([7, 3, 3])
    assert _positions(s).tolist() == [7, 3, 3] and s.y.tolist() == [2, 3, 3]
    m = a.subset(a.y == 4)
    assert _positions(m).tolist() == [4, 9, 14, 19, 24, 29, 34, 39, 44, 49]
    assert m.provenance["selection"][-1]["op"] == "subset"
    with pytest.raises(DataError, match="only 50 images"):
        a.subset([50])


def test_stratified_indices_exact_total() -> None:
    y = np.array([0] * 7 + [1] * 2 + [2] * 1)
    for k in range(0, 12):
        idx = stratified_indices(y, k, seed=1)
        assert len(idx) == min(k, len(y)) and len(set(idx.tolist())) == len(idx)
        assert np.all(np.abs(np.bincount(y[idx], minlength=3) - np.bincount(y) * min(k, 10) / 10) < 1)


def test_limit_is_stratified_and_deterministic(npz_train: dict) -> None:
    a = load_dataset([CIFAR_TRAIN], limit=100, seed=5)
    assert len(a) == 100 and a.class_counts().tolist() == [10] * 10
    b = load_dataset([CIFAR_TRAIN], limit=100, seed=5)
    c = load_dataset([CIFAR_TRAIN], limit=100, seed=6)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.x, c.x)
    rows = {r.tobytes() for r in npz_train["x"]}
    assert all(r.tobytes() in rows for r in a.x)
    assert len(load_dataset([CIFAR_TEST], limit=5000)) == 1017


def test_image_arrays_validation() -> None:
    a = ImageArrays(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1]), ("a", "b"), {"n": np.int64(2), "c": np.ones(2)})
    assert json.loads(json.dumps(a.provenance)) == {"n": 2, "c": [1.0, 1.0]}
    with pytest.raises(DataError, match="uint8"):
        ImageArrays(np.zeros((2, 4, 4, 3), np.float32), np.zeros(2, np.int64), ("a",), {})
    with pytest.raises(DataError, match="labels span 0..2 but there are 2 class names"):
        ImageArrays(np.zeros((3, 4, 4, 3), np.uint8), np.arange(3), ("a", "b"), {"paths": ["/d"]})


# ---------------------------------------------------------------------------------------------
# Torch batches
# ---------------------------------------------------------------------------------------------
def test_to_tensor_and_batches(npz_test: dict) -> None:
    torch = pytest.importorskip("torch")
    from ism_edge_training.data import iterate_batches, to_tensor

    a = load_dataset([CIFAR_TEST], limit=300)
    t = to_tensor(a.x)
    assert t.dtype == torch.float32 and t.shape == (300, 3, 32, 32)
    assert torch.equal(t[5, 1], torch.from_numpy(a.x[5, :, :, 1]).float() / 255)
    got = list(iterate_batches(a, 128, shuffle=False))
    assert [len(xb) for xb, _ in got] == [128, 128, 44]
    for xb, yb in got:
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64 and xb.shape[1:] == (3, 32, 32)
        assert xb.min() >= 0 and xb.max() <= 1
    assert torch.equal(torch.cat([xb for xb, _ in got]), t)
    assert torch.equal(torch.cat([yb for _, yb in got]), torch.from_numpy(a.y))
    s1 = torch.cat([yb for _, yb in iterate_batches(a, 64, shuffle=True, seed=1)])
    s2 = torch.cat([yb for _, yb in iterate_batches(a, 64, shuffle=True, seed=1)])
    x3 = torch.cat([xb for xb, _ in iterate_batches(a, 64, shuffle=True, seed=2)])
    assert torch.equal(s1, s2) and torch.equal(torch.sort(s1).values, torch.sort(torch.from_numpy(a.y)).values)
    assert not torch.equal(x3, t)
    with pytest.raises(DataError, match="batch size"):
        next(iterate_batches(a, 0, shuffle=False))


def test_augmentation_is_reflect_crop_and_flip(npz_test: dict) -> None:
    torch = pytest.importorskip("torch")
    from ism_edge_training.data import iterate_batches

    a = load_dataset([CIFAR_TEST], limit=64)
    aug = torch.cat([xb for xb, _ in iterate_batches(a, 32, shuffle=False, augment=True, seed=7)])
    assert aug.shape == (64, 3, 32, 32) and aug.min() >= 0 and aug.max() <= 1
    assert not torch.equal(aug, torch.cat([xb for xb, _ in iterate_batches(a, 32, shuffle=False)]))
    pixels = (aug * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    padded = np.pad(a.x, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    flips = 0
    for i in range(64):
        options = [(padded[i, dy:dy + 32, dx:dx + 32][:, ::f], f)
                   for dy in range(9) for dx in range(9) for f in (1, -1)]
        match = [f for crop, f in options if np.array_equal(crop, pixels[i])]
        assert match, f"augmented image {i} is no reflect-padded crop of the original"
        flips += match[0] == -1
    assert 10 < flips < 54


def test_loaders_do_not_import_torch() -> None:
    code = (f"import sys; import ism_edge_training.data as d; d.load_dataset([r'{CIFAR_TEST}'], limit=10); "
            f"d.load_dataset([r'{CELEBA}'], image_size=8, limit=4); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
