"""Data for the backdoor lab: the embedded digits set, tensor loaders and optional vision loaders.

The default data set is scikit-learn's handwritten digits: 1,797 real 8x8 grey images (pixel
values 0..16) that ship inside scikit-learn, so tests and the demo never download anything.
CIFAR-10, GTSRB and image folders are optional loaders for users who already have the files; they
need torchvision (``pip install bdfast[vision]``) and never download either.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

__all__ = ["Digits", "load_digits", "tensor_loader", "cifar10", "gtsrb", "image_folder"]

Split = Tuple[Tensor, Tensor]

# Fractions of the whole digits set; the attacker trains on what is left (about 60%).
CLEAN_FRACTION = 0.15
TEST_FRACTION = 0.25


@dataclass(frozen=True)
class Digits:
    """The three splits of the digits set.

    Each split is ``(x [N, 1, size, size] float32 in [0, 1], y [N] int64)``.

    ``train`` is what an attacker poisons and trains on, ``clean`` is the defender's small clean
    labelled set and ``test`` measures accuracy and attack success.
    """

    train: Split
    clean: Split
    test: Split
    num_classes: int
    size: int


def load_digits(size: int = 16, seed: int = 0) -> Digits:
    """scikit-learn's digits scaled to [0, 1], upsampled (bilinear) to ``size x size`` and split.

    The split is stratified by class and fixed by ``seed``: about 15% ``clean``, 25% ``test`` and
    the rest ``train``. Returns a :class:`Digits` whose splits are
    ``(x [N, 1, size, size] float32, y [N] int64)``.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8 (the digits are 8x8 images), got {size!r}")
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

    return Digits(train=take(train), clean=take(clean), test=take(test), num_classes=10, size=size)


class _TensorBatches:
    """Indexable by a list of indices, so the DataLoader gathers a whole batch in one indexing op
    instead of collating one small tensor per sample."""

    def __init__(self, x: Tensor, y: Optional[Tensor]):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, indices: List[int]) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.x.device)
        if self.y is None:
            return self.x[idx]
        return self.x[idx], self.y[idx.to(self.y.device)]


def tensor_loader(x: Tensor, y: Optional[Tensor] = None, batch_size: int = 64,
                  shuffle: bool = False, seed: Optional[int] = None) -> DataLoader:
    """A DataLoader over in-memory tensors yielding ``x [b, ...]`` or ``(x [b, ...], y [b])``.

    ``x`` is ``[N, ...]`` and ``y`` (optional) is ``[N]``. With ``shuffle`` the order is drawn from
    a generator seeded with ``seed`` (fresh randomness when ``seed`` is None). The last batch may
    be smaller than ``batch_size``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or len(x) == 0:
        raise ValueError(f"x must be a non-empty tensor [N, ...], got shape {tuple(x.shape)}")
    if y is not None:
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor or None, got {type(y).__name__}")
        if y.dim() != 1 or len(y) != len(x):
            raise ValueError(f"y must have shape [{len(x)}] to match x, got {tuple(y.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dataset = _TensorBatches(x, y)
    if shuffle:
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
        sampler: Any = RandomSampler(range(len(x)), generator=generator)
    else:
        sampler = SequentialSampler(range(len(x)))
    # batch_size=None turns off the DataLoader's own batching: the sampler hands whole index
    # lists to _TensorBatches.
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False),
                      batch_size=None, collate_fn=_as_is)


def _as_is(batch: Any) -> Any:
    # The default conversion would turn the (x, y) tuple into a list.
    return batch


def _torchvision(what: str) -> Any:
    try:
        import torchvision
    except ImportError as error:
        raise ImportError(f"bdfast.data.{what} needs torchvision, which is not installed; "
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
