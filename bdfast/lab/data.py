"""Data for the backdoor lab: the embedded digits set, Fashion-MNIST and optional vision loaders.

The default data set is scikit-learn's handwritten digits: 1,797 real 8x8 grey images (pixel
values 0..16) that ship inside scikit-learn, so tests and the demo never download anything.
CIFAR-10, GTSRB and image folders are optional loaders for users who already have the files; they
need torchvision (``pip install bdfast[vision]``) and never download either.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bdfast._utils import check_number

__all__ = ["LabData", "Digits", "load_digits", "load_fashion_mnist", "FASHION_MNIST_ROOT",
           "cifar10", "gtsrb", "image_folder"]

Split = Tuple[Tensor, Tensor]

# Fractions of the whole digits set; the attacker trains on what is left (about 60%).
CLEAN_FRACTION = 0.15
TEST_FRACTION = 0.25


@dataclass(frozen=True)
class LabData:
    """The three splits of a lab data set (digits or Fashion-MNIST).

    Each split is ``(x [N, 1, size, size] float32 in [0, 1], y [N] int64)``.

    ``train`` is what an attacker poisons and trains on, ``clean`` is the defender's small clean
    labelled set and ``test`` measures accuracy and attack success.
    """

    train: Split
    clean: Split
    test: Split
    num_classes: int
    size: int


# What load_digits has always returned; the same type serves every lab data set.
Digits = LabData


def load_digits(size: int = 16, seed: int = 0) -> Digits:
    """scikit-learn's digits scaled to [0, 1], upsampled (bilinear) to ``size x size`` and split.

    The split is stratified by class and fixed by ``seed``: about 15% ``clean``, 25% ``test`` and
    the rest ``train``. Returns a :class:`LabData` whose splits are
    ``(x [N, 1, size, size] float32, y [N] int64)``.
    """
    check_number(size, "size", integer=True, minimum=8, note=" (the digits are 8x8 images)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = _sk_load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    if size != 8:
        # Bilinear weights are convex, so the upsampled pixels stay in [0, 1]; the clamp only
        # removes float rounding.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    y = torch.from_numpy(bunch.target.astype(np.int64))

    index = np.arange(len(y))
    labels = bunch.target
    rest, test = train_test_split(index, test_size=TEST_FRACTION, stratify=labels,
                                  random_state=int(seed))
    train, clean = train_test_split(rest, test_size=CLEAN_FRACTION / (1.0 - TEST_FRACTION),
                                    stratify=labels[rest], random_state=int(seed))

    def take(idx: np.ndarray) -> Split:
        # Sorted indices keep each split in the data set's own order, so a split does not depend
        # on how train_test_split happened to shuffle it.
        idx_t = torch.from_numpy(np.sort(idx))
        return x[idx_t].contiguous(), y[idx_t].contiguous()

    return LabData(train=take(train), clean=take(clean), test=take(test), num_classes=10, size=size)


# Where Debian's dataset-fashion-mnist package puts the four IDX files.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: str) -> np.ndarray:
    """An IDX file (gzipped) as a uint8 array of the shape its header gives."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {data.size} values, its header says {shape}")
    return data.reshape(shape)


def _stratified_subset(y: np.ndarray, count: Optional[int], rng: np.random.Generator,
                       what: str) -> np.ndarray:
    """Sorted indices of ``count`` items of ``y`` with (nearly) equal shares per class; all of
    them when ``count`` is None."""
    if count is None:
        return np.arange(len(y))
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(y):
        raise ValueError(f"{what} must be None or an int in [1, {len(y)}], got {count!r}")
    order = rng.permutation(len(y))
    # Round-robin over classes in a random order within each class: any prefix is stratified.
    rank = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        members = order[y[order] == c]
        rank[members] = np.arange(len(members))
    keys = rank * (int(y.max()) + 1) + y
    return np.sort(order[np.argsort(keys[order], kind="stable")][:count])


def load_fashion_mnist(root: Optional[str] = None, *, train_size: Optional[int] = None,
                       clean_size: int = 3000, test_size: Optional[int] = None,
                       seed: int = 0) -> LabData:
    """Fashion-MNIST from its four standard IDX ``.gz`` files in ``root``.

    ``root`` defaults to :data:`FASHION_MNIST_ROOT`, where Debian's ``dataset-fashion-mnist``
    package installs them (``make data``); any folder holding the files works. Nothing is
    downloaded. ``clean`` (the defender's labelled clean set, ``clean_size`` images) and
    ``train`` (what an attacker poisons: the rest of the official training set, or
    ``train_size`` of it) come from the official 60,000 training images; ``test`` is the
    official 10,000-image test set, or ``test_size`` of it. Every subset is stratified by class
    and fixed by ``seed``, and keeps the files' order. Returns a :class:`LabData` with splits
    ``(x [N, 1, 28, 28] float32 in [0, 1], y [N] int64)`` and 10 classes.
    """
    root = FASHION_MNIST_ROOT if root is None else os.fspath(root)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    missing = [name for pair in _FASHION_FILES.values() for name in pair
               if not os.path.isfile(os.path.join(root, name))]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {missing} are not in {root!r}; install Debian's "
            "dataset-fashion-mnist package (make data) or pass root= a folder holding the four "
            "IDX .gz files")
    arrays = {}
    for split, (images, labels) in _FASHION_FILES.items():
        x = _read_idx(os.path.join(root, images))
        y = _read_idx(os.path.join(root, labels))
        if x.ndim != 3 or y.shape != (len(x),):
            raise ValueError(f"{images} and {labels} in {root!r} do not pair up: images "
                             f"{x.shape}, labels {y.shape}")
        arrays[split] = (x, y.astype(np.int64))

    rng = np.random.default_rng(int(seed))
    x_all, y_all = arrays["train"]
    if isinstance(clean_size, bool) or not isinstance(clean_size, int) \
            or not 2 <= clean_size < len(y_all):
        raise ValueError(f"clean_size must be an int in [2, {len(y_all)}), got {clean_size!r}")
    clean = _stratified_subset(y_all, clean_size, rng, "clean_size")
    rest = np.setdiff1d(np.arange(len(y_all)), clean)
    train = rest[_stratified_subset(y_all[rest], train_size, rng, "train_size")]
    x_test, y_test = arrays["test"]
    test = _stratified_subset(y_test, test_size, rng, "test_size")

    def take(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> Split:
        images = torch.from_numpy(x[idx].astype(np.float32) / 255.0).unsqueeze(1)
        return images.contiguous(), torch.from_numpy(y[idx]).contiguous()

    return LabData(train=take(x_all, y_all, train), clean=take(x_all, y_all, clean),
                   test=take(x_test, y_test, test), num_classes=10, size=x_all.shape[1])


def _torchvision(what: str) -> Any:
    try:
        import torchvision
    except ImportError as error:
        raise ImportError(f"bdfast.lab.data.{what} needs torchvision, which is not installed; "
                          "install it with `pip install bdfast[vision]`.") from error
    return torchvision


def _not_found(what: str, root: str, error: BaseException) -> FileNotFoundError:
    return FileNotFoundError(f"{what} was not found under {root!r} ({error}); bdfast never "
                             "downloads data, so put the files there first.")


def _stack(dataset: Any, what: str) -> Split:
    """Materialise a torchvision dataset yielding (image tensor [C, H, W], label) as tensors."""
    if len(dataset) == 0:
        raise ValueError(f"{what} is empty")
    images, labels = [], []
    for image, label in dataset:
        images.append(image)
        labels.append(int(label))
    return torch.stack(images).float(), torch.tensor(labels, dtype=torch.long)


def cifar10(root: str, train: bool = True) -> Split:
    """CIFAR-10 from torchvision's files under ``root`` (``cifar-10-batches-py``), no download.

    Returns ``(x [N, 3, 32, 32] float32 in [0, 1], y [N] int64)``, N = 50,000 (train) or 10,000.
    """
    tv = _torchvision("cifar10")
    try:
        ds = tv.datasets.CIFAR10(os.fspath(root), train=bool(train), download=False)
    except RuntimeError as error:
        raise _not_found("CIFAR-10", os.fspath(root), error) from error
    # The raw uint8 array converts in one step; going through PIL per image is 100x slower.
    x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(), torch.tensor(ds.targets, dtype=torch.long)


def gtsrb(root: str, split: str = "train", size: int = 32) -> Split:
    """GTSRB from torchvision's files under ``root`` (``gtsrb/``), no download.

    ``split`` is "train" or "test"; images are resized to ``size x size``. Returns
    ``(x [N, 3, size, size] float32 in [0, 1], y [N] int64)`` with 43 classes.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    tv = _torchvision("gtsrb")
    transform = tv.transforms.Compose([tv.transforms.Resize((size, size)),
                                       tv.transforms.ToTensor()])
    try:
        ds = tv.datasets.GTSRB(os.fspath(root), split=split, transform=transform, download=False)
    except RuntimeError as error:
        raise _not_found("GTSRB", os.fspath(root), error) from error
    return _stack(ds, f"GTSRB ({split}) under {os.fspath(root)!r}")


def image_folder(root: str, size: int = 32) -> Split:
    """Images in ``root/<class name>/*.png|jpg...`` (torchvision's ImageFolder layout).

    Images are converted to RGB and resized to ``size x size``; classes are numbered in sorted
    order of the folder names. Returns ``(x [N, 3, size, size] float32 in [0, 1], y [N] int64)``.
    """
    tv = _torchvision("image_folder")
    if not os.path.isdir(root):
        raise FileNotFoundError("root must be an existing folder of class sub-folders, "
                                f"got {root!r}")
    transform = tv.transforms.Compose([tv.transforms.Lambda(lambda im: im.convert("RGB")),
                                       tv.transforms.Resize((size, size)),
                                       tv.transforms.ToTensor()])
    try:
        ds = tv.datasets.ImageFolder(os.fspath(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as error:
        raise _not_found("an image folder", os.fspath(root), error) from error
    return _stack(ds, f"the image folder {os.fspath(root)!r}")
