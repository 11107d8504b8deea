"""BackdoorBench's attack records in, its defense results out (docs/backdoorbench.md).

BackdoorBench (github.com/SCLBD/BackdoorBench) keeps each attack in a folder ``record/<name>/``.
Its ``attack_result.pt`` holds the attacked model's state_dict, the data set's name and, for the
poisoned training and test sets, which images of the clean set they take and where the PNG files
of the poisoned images are. This module reads that format as ``utils/save_load_attack.py`` and
``utils/bd_dataset_v2.py`` write it (commit f02e3534645f0ee63d6848653062cd6c0d6c400d) without
importing BackdoorBench, and writes ``record/<name>/defense/bdfast-<method>/defense_result.pt``
in the format its own defenses use, with a summary CSV in their column names.

What the module promises about a record it did not write (tests/interop/test_backdoorbench_fuzz.py):

- ``attack_result.pt`` and ``info.pickle`` are read with ``torch.load(weights_only=True)`` and an
  allow-list of the few numpy types the record's index arrays need, and the CIFAR files with an
  unpickler restricted to the same list, so unpickling them runs no code.
- Every file the record names, and the record's own two files, must resolve (symlinks followed)
  inside the record folder or ``bb_root``; all of them are checked, with the record's types,
  index ranges and model, before any image or data set file is read. Anything else is refused in
  one sentence.
- The record's images are decoded as PNG only, and no image over :data:`IMAGE_PIXEL_LIMIT`
  pixels is decoded, so no other Pillow decoder (EPS's, which starts Ghostscript) sees them.

The data set's files under ``data_root`` are the user's: they are read where they are, as their
own formats (the same pixel limit applies to GTSRB's and Tiny-ImageNet's images).
"""
from __future__ import annotations

import codecs
import csv
import functools
import importlib
import numbers
import operator
import os
import pickle
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from bdfast._utils import eval_mode
from bdfast.lab.data import _read_idx
from bdfast.lab.metrics import predict
from bdfast.lab.models import preact_resnet18_backdoorbench

__all__ = ["BackdoorBenchRecord", "ImageSet", "Normalized", "load_record", "clean_subset",
           "evaluate_record", "save_defense_result", "DATASETS", "MODELS", "DEFAULT_CLEAN_RATIO",
           "IMAGE_PIXEL_LIMIT"]

PathLike = Union[str, "os.PathLike[str]"]

# The share of the clean training set that BackdoorBench's defenses get by default (``ratio:
# 0.05`` in config/defense/*/config.yaml).
DEFAULT_CLEAN_RATIO = 0.05

# The models BackdoorBench builds as torchvision builds them from a name and a class count
# (utils/aggregate_block/model_trainer_generate.py). googlenet and inception_v3 are left out:
# in training mode they return auxiliary outputs besides the logits.
TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "alexnet", "vgg11", "vgg16", "vgg19",
                      "vgg19_bn", "squeezenet1_0", "densenet121", "densenet161",
                      "shufflenet_v2_x1_0", "mobilenet_v2", "mobilenet_v3_large",
                      "resnext50_32x4d", "wide_resnet50_2", "mnasnet1_0", "efficientnet_b0",
                      "efficientnet_b3", "convnext_tiny")
MODELS = ("preactresnet18",) + TORCHVISION_MODELS
# The torchvision models that tests/defenses/test_model_zoo.py builds with the same call and runs
# every defense on (random weights, 32x32 images): MEDIC, BCU, and DDE and MBNS (or, on
# convnext_tiny, which has no BatchNorm, their one-sentence refusal). The others are not run there.
ZOO_TESTED = ("resnet18", "efficientnet_b0", "convnext_tiny")

_RECORD_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data",
                "bd_train", "bd_test")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# The Pillow formats of those extensions, for the data sets' own images; a record's are PNG.
_DATASET_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP")
_RECORD_FORMATS = ("PNG",)

# No BackdoorBench data set comes near it (Tiny-ImageNet's 64 x 64 images are the largest); an
# image claiming more is refused from its header, before it is decoded.
IMAGE_PIXEL_LIMIT = 4096 * 4096

# What BackdoorBench writes under each key load_record checks the type of.
_RECORD_TYPES = {"model_name": (str, "a name"), "clean_data": (str, "a name"),
                 "num_classes": (numbers.Integral, "a whole number"),
                 "model": (Mapping, "a state_dict"), "bd_train": ((dict, type(None)), "a dict"),
                 "bd_test": (dict, "a dict")}


# ----------------------------------------------------------------------------- safe loading

@functools.lru_cache(maxsize=None)
def _numpy_globals() -> Dict[str, Any]:
    """The numpy globals an index array, a float indicator array and an int64 dictionary key
    pickle to, under the names numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) write."""
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy 1 may have only numpy.core
        multiarray = importlib.import_module("numpy.core.multiarray")
    allowed: Dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[f"{package}.multiarray._reconstruct"] = multiarray._reconstruct
        allowed[f"{package}.multiarray.scalar"] = multiarray.scalar
    # Unpickling a dtype sets its state, which torch allows only for listed classes: those of
    # the dtypes BackdoorBench stores (int64 indices, float64 indicators; np.arange gives int32
    # on Windows).
    for dtype in (np.int64, np.int32, np.float64):
        kind = type(np.dtype(dtype))
        allowed[f"{kind.__module__}.{kind.__qualname__}"] = kind
    return allowed


def _load_safely(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with the numpy allow-list; a ValueError naming the
    first type outside it, or why the file cannot be read."""
    if not hasattr(torch.serialization, "safe_globals"):
        raise RuntimeError("reading BackdoorBench records needs torch.serialization.safe_globals, "
                           f"which torch {torch.__version__} lacks; update torch")
    allowed = [(obj, name) for name, obj in _numpy_globals().items()]
    if path.stat().st_size == 0:
        raise ValueError(f"cannot read {path}: the file is empty")
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", str(error))
        if found is None:
            raise ValueError(f"cannot read {path}: {_first_line(error)}") from None
        raise ValueError(f"{path} holds a {found.group(1) or found.group(2)}, which is not a "
                         "tensor, a numpy array or a plain Python value, so bdfast does not "
                         "unpickle it") from None
    except (RuntimeError, OSError, EOFError) as error:
        raise ValueError(f"cannot read {path}: {_first_line(error)}") from error


class _NumpyUnpickler(pickle.Unpickler):
    """An unpickler that builds plain Python values and numpy arrays, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            # Python 3's protocol 2 writes bytes as _codecs.encode(text, "latin1").
            return codecs.encode
        found = _numpy_globals().get(f"{module}.{name}")
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array type")
        return found


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# ----------------------------------------------------------------------------- images

class ImageSet(Dataset):
    """Images of a record, kept as uint8 and handed out as float32 in [0, 1].

    Attributes:
        images: uint8 ``[N, C, H, W]``.
        labels: int64 ``[N]``, the label each image was trained or is tested against (the
            attack's label for a poisoned image).
        original_labels: int64 ``[N]``, each image's true class.
        poisoned: bool ``[N]``, which images carry the trigger.

    ``set[i]`` is ``(image [C, H, W] float32, label int)``, as a torchvision data set gives.
    """

    def __init__(self, images: Tensor, labels: Tensor, original_labels: Optional[Tensor] = None,
                 poisoned: Optional[Tensor] = None):
        self.images = images
        self.labels = labels
        self.original_labels = labels if original_labels is None else original_labels
        self.poisoned = (torch.zeros(len(labels), dtype=torch.bool) if poisoned is None
                         else poisoned)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        return self.images[index].float().div_(255.0), int(self.labels[index])

    def tensors(self, index: Optional[Sequence[int]] = None) -> Tuple[Tensor, Tensor]:
        """``(x [n, C, H, W] float32 in [0, 1], labels [n] int64)`` of the images at ``index``
        (all of them by default)."""
        if index is None:
            return self.images.float().div_(255.0), self.labels.clone()
        chosen = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return self.images[chosen].float().div_(255.0), self.labels[chosen]

    def batches(self, batch_size: int = 256) -> "_FloatBatches":
        """A re-iterable loader of ``(x [b, C, H, W] float32 in [0, 1], labels [b])`` in order;
        only one batch at a time is converted to float."""
        return _FloatBatches(self.images, self.labels, batch_size)


class _FloatBatches:
    """Batches ``(x [b, C, H, W] float32 in [0, 1], labels [b] int64)`` of uint8 images."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int):
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.labels), self.batch_size):
            stop = start + self.batch_size
            yield self.images[start:stop].float().div_(255.0), self.labels[start:stop]


def _pil_image():
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("reading BackdoorBench's PNG files needs Pillow, which is not "
                          "installed; install it with `pip install pillow`.") from error
    return Image


def _read_image(path: Path, size: Tuple[int, int, int], what: str,
                formats: Sequence[str]) -> Tensor:
    """The image file at ``path``, decoded only if it is one of Pillow's ``formats`` of at most
    :data:`IMAGE_PIXEL_LIMIT` pixels, as uint8 ``[C, H, W]``: converted to ``size``'s channels
    (1: greyscale, 3: RGB) and resized (bilinear, as BackdoorBench's transforms) to its H x W."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path.name} was not found in {path.parent}")
    height, width, channels = size
    image_module = _pil_image()
    kinds = " or ".join(formats)
    try:
        with warnings.catch_warnings():
            # Pillow warns of an image over its own, higher, global limit; the one here raises.
            warnings.simplefilter("ignore", image_module.DecompressionBombWarning)
            image = image_module.open(path, formats=list(formats))
    except image_module.DecompressionBombError:
        raise ValueError(f"{what} {path} claims more than {IMAGE_PIXEL_LIMIT} pixels, so it is "
                         "not decoded") from None
    except image_module.UnidentifiedImageError:
        raise ValueError(f"{what} {path} is not a {kinds} file") from None
    except Exception as error:  # Pillow's decoders fail on bad files in many exception types
        raise ValueError(f"{what} {path} is not a {kinds} file that Pillow can read "
                         f"({_first_line(error)})") from None
    with image:
        if image.width * image.height > IMAGE_PIXEL_LIMIT:
            raise ValueError(f"{what} {path} claims {image.width} x {image.height} pixels, more "
                             f"than {IMAGE_PIXEL_LIMIT}, so it is not decoded")
        try:
            image = image.convert("L" if channels == 1 else "RGB")
        except Exception as error:  # as above: a truncated or corrupt file
            raise ValueError(f"{what} {path} is a broken {kinds} file "
                             f"({_first_line(error)})") from None
    if image.size != (width, height):
        image = image.resize((width, height), image_module.BILINEAR)
    array = np.asarray(image, dtype=np.uint8).reshape(height, width, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _read_images(paths: Sequence[Path], size: Tuple[int, int, int], what: str) -> Tensor:
    """A data set's image files (any of :data:`_DATASET_FORMATS`) as uint8 ``[N, C, H, W]``."""
    height, width, channels = size
    images = torch.empty(len(paths), channels, height, width, dtype=torch.uint8)
    for i, path in enumerate(paths):
        images[i] = _read_image(path, size, what, _DATASET_FORMATS)
    return images


# ----------------------------------------------------------------------------- data sets

@dataclass(frozen=True)
class _DataSet:
    classes: int  # get_num_classes in utils/aggregate_block/dataset_and_transform_generate.py
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    # read(root, train, size) -> (uint8 images [N, C, H, W], int64 labels [N])
    read: Callable[[Path, bool, Tuple[int, int, int]], Tuple[Tensor, Tensor]]


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} {path.name} was not found in {path.parent}; data_root "
                                "must be the folder the attack read its data set from, "
                                "BackdoorBench's data/<data set>")
    return path


def _check_native_size(images: Tensor, size: Tuple[int, int, int], title: str) -> None:
    if tuple(images.shape[1:]) != (size[2], size[0], size[1]):
        raise ValueError(f"the record's img_size {size} differs from the {title} images' "
                         f"{tuple(images.shape[2:])} x {images.shape[1]} channels")


def _cifar_reader(title: str, folder: str, train_files: Sequence[str], test_files: Sequence[str],
                  label_key: str):
    def read(root: Path, train: bool, size: Tuple[int, int, int]) -> Tuple[Tensor, Tensor]:
        images: List[np.ndarray] = []
        labels: List[int] = []
        for name in train_files if train else test_files:
            path = _require(root / folder / name, f"{title} file")
            try:
                with open(path, "rb") as f:
                    # Python 2 pickled the files: latin1 turns their byte strings into str.
                    batch = _NumpyUnpickler(f, encoding="latin1").load()
                images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(int(label) for label in batch[label_key])
            except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path} is not a {title} batch of torchvision's files "
                                 f"({_first_line(error)})") from None
        x = torch.from_numpy(np.concatenate(images))
        _check_native_size(x, size, title)
        return x, torch.tensor(labels, dtype=torch.long)
    return read


def _read_mnist(root: Path, train: bool, size: Tuple[int, int, int]) -> Tuple[Tensor, Tensor]:
    # torchvision's layout: the IDX files it downloads, kept gzipped beside the extracted ones.
    prefix = "train" if train else "t10k"
    raw = root / "MNIST" / "raw"
    images = _read_idx(str(_require(raw / f"{prefix}-images-idx3-ubyte.gz", "MNIST file")))
    labels = _read_idx(str(_require(raw / f"{prefix}-labels-idx1-ubyte.gz", "MNIST file")))
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    _check_native_size(x, size, "MNIST")
    return x, torch.from_numpy(labels.astype(np.int64))


def _read_gtsrb_csv(table: Path, folder: Path) -> Tuple[List[Path], List[int]]:
    """Image paths and classes of a GTSRB annotation file (``;``-separated; the file name in the
    first column, the class in the eighth, ``ClassId``)."""
    with open(_require(table, "GTSRB annotation file"), newline="") as f:
        rows = list(csv.reader(f, delimiter=";"))[1:]
    return [folder / row[0] for row in rows], [int(row[7]) for row in rows]


def _read_gtsrb(root: Path, train: bool, size: Tuple[int, int, int]) -> Tuple[Tensor, Tensor]:
    # BackdoorBench's layout (its dataset/GTSRB.py): Train/<class>/GT-<class>.csv for the 43
    # classes in order, Test/GT-final_test.csv.
    paths: List[Path] = []
    labels: List[int] = []
    if train:
        for c in range(43):
            folder = root / "Train" / f"{c:05d}"
            more_paths, more_labels = _read_gtsrb_csv(folder / f"GT-{c:05d}.csv", folder)
            paths += more_paths
            labels += more_labels
    else:
        paths, labels = _read_gtsrb_csv(root / "Test" / "GT-final_test.csv", root / "Test")
    return _read_images(paths, size, "GTSRB image"), torch.tensor(labels, dtype=torch.long)


def _read_tiny(root: Path, train: bool, size: Tuple[int, int, int]) -> Tuple[Tensor, Tensor]:
    # An image folder per class, in torchvision ImageFolder's order: classes sorted by name,
    # files sorted within each sorted sub-folder. BackdoorBench moves the validation images into
    # such folders before its first use.
    split = _require(root / "tiny-imagenet-200" / ("train" if train else "val"),
                     "Tiny-ImageNet folder")
    classes = sorted(entry.name for entry in os.scandir(split) if entry.is_dir())
    paths: List[Path] = []
    labels: List[int] = []
    for label, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(split / name, followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(_IMAGE_EXTENSIONS):
                    paths.append(Path(folder) / file)
                    labels.append(label)
    if not paths:
        raise FileNotFoundError(f"no Tiny-ImageNet images were found in {split}")
    return (_read_images(paths, size, "Tiny-ImageNet image"),
            torch.tensor(labels, dtype=torch.long))


# Keyed by BackdoorBench's data set names; mean and std are its normalisation of each
# (utils/aggregate_block/dataset_and_transform_generate.py).
DATASETS: Dict[str, _DataSet] = {
    "cifar10": _DataSet(10, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261),
                        _cifar_reader("CIFAR-10", "cifar-10-batches-py",
                                      [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                                      "labels")),
    "cifar100": _DataSet(100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                         _cifar_reader("CIFAR-100", "cifar-100-python", ["train"], ["test"],
                                       "fine_labels")),
    "mnist": _DataSet(10, (0.5,), (0.5,), _read_mnist),
    "gtsrb": _DataSet(43, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), _read_gtsrb),
    "tiny": _DataSet(200, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262),
                     _read_tiny),
}


# ----------------------------------------------------------------------------- models

class Normalized(nn.Module):
    """A classifier trained on standardised images, taking images in [0, 1]:
    ``x [B, C, H, W]`` -> ``model((x - mean) / std)``, logits ``[B, K]``.

    ``mean`` and ``std`` (one value per channel) are buffers left out of the state_dict, whose
    keys are the wrapped model's with a ``model.`` prefix.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W]`` in [0, 1] -> the wrapped model's logits ``[B, K]``."""
        return self.model((x - self.mean) / self.std)


def _without_module_prefix(state: Mapping[str, Tensor]) -> "OrderedDict[str, Tensor]":
    """``state`` with the ``module.`` that nn.DataParallel (BackdoorBench's way to use several
    GPUs) puts before every key removed, from its per-module ``_metadata`` too: some modules
    (torchvision's MNASNet) read their version from there when they load."""
    def strip(key: str) -> str:
        if key == "module":  # the wrapped model's own metadata entry
            return ""
        return key[len("module."):] if key.startswith("module.") else key

    stripped = OrderedDict((strip(key), value) for key, value in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        stripped._metadata = OrderedDict(  # type: ignore[attr-defined]
            (strip(key), value) for key, value in metadata.items())
    return stripped


def _build_network(model_name: str, num_classes: int, state: Mapping[str, Tensor], what: str,
                   by_position: bool = False) -> nn.Module:
    """The model ``model_name`` in BackdoorBench's layout with ``state`` (of ``what``, for the
    errors) loaded strictly, or with ``by_position`` as BackdoorBench loads a record's weights:
    under the model's own names, position by position, when only the names differ."""
    if model_name == "preactresnet18":
        stem = state.get("conv1.weight", next(iter(state.values()), None))
        if not isinstance(stem, Tensor) or stem.dim() != 4:
            raise ValueError(f"{what} has no 4-D conv1.weight (nor a 4-D first tensor), which a "
                             "preactresnet18 has")
        # Channels and width come from the weights (3 and 64 in BackdoorBench), so that a
        # narrower net of the same layout loads too.
        network: nn.Module = preact_resnet18_backdoorbench(num_classes, in_channels=stem.shape[1],
                                                           width=stem.shape[0])
    elif model_name in TORCHVISION_MODELS:
        try:
            import torchvision
        except ImportError as error:
            raise ImportError(f"the record's {model_name} is built by torchvision, which is not "
                              "installed; install it with `pip install bdfast[vision]`.") from error
        network = getattr(torchvision.models, model_name)(num_classes=num_classes)
    else:
        raise ValueError(f"the record's model {model_name!r} is not supported; bdfast reads "
                         f"{', '.join(MODELS)}")
    _load_weights(network, state, what, f"BackdoorBench's {model_name} with {num_classes} classes",
                  by_position)
    return network


def _load_weights(network: nn.Module, state: Mapping[str, Tensor], what: str, model: str,
                  by_position: bool) -> None:
    """Load ``state`` into ``network`` strictly or, with ``by_position`` and names that differ,
    as BackdoorBench's load_attack_result does: the same number of tensors, renamed to the
    network's names position by position, and then each of the shape of the tensor it replaces.
    A ValueError says what of ``what`` (the weights) does not fit ``model`` (the network)."""
    try:
        network.load_state_dict(state, strict=True)
        return
    except RuntimeError as error:
        lines = str(error).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
    refusal = f"{what} does not fit {model}"
    own = network.state_dict()
    if not by_position or len(state) != len(own) or set(state) == set(own):
        raise ValueError(f"{refusal}: {detail}")
    pairs = zip(state.items(), own.items())
    for position, ((key, value), (own_key, own_value)) in enumerate(pairs):
        if value.shape != own_value.shape:
            raise ValueError(f"{refusal}, not even by position: its tensor {position}, {key}, "
                             f"has shape {tuple(value.shape)}, where {own_key} has "
                             f"{tuple(own_value.shape)}")
    renamed = OrderedDict(zip(own, state.values()))
    # The per-module versions some modules read when they load are those of the net built
    # here: the record's are filed under names that are not the net's.
    renamed._metadata = own._metadata  # type: ignore[attr-defined]
    network.load_state_dict(renamed, strict=True)
    old, new = next((a, b) for a, b in zip(state, own) if a != b)
    warnings.warn(f"{what} names its {len(state)} tensors otherwise than {model} (the first "
                  f"that differs: {old} for {new}); they were loaded by position, as "
                  "BackdoorBench loads them", stacklevel=4)


# ----------------------------------------------------------------------------- records

@dataclass
class BackdoorBenchRecord:
    """What :func:`load_record` reads from ``record/<name>``.

    Attributes:
        record_dir: the record folder.
        model: the attacked model, wrapped in :class:`Normalized` so that it takes images in
            [0, 1]; ``model.model`` is the network in BackdoorBench's layout. In eval mode.
        model_name, num_classes, clean_data: as the record names them (e.g. "preactresnet18",
            10, "cifar10").
        img_size: ``(H, W, C)`` of the images the model takes.
        attack: the attack's name from the record's ``info.pickle`` (e.g. "badnet"), or None.
        target: the one label of every poisoned test image (an all-to-one attack), else None.
        clean_train, clean_test: the clean data set the attack started from.
        bd_train: the poisoned training set the model was trained on (clean images and poisoned
            ones in the attack's order), or None when the record has none.
        bd_test: the poisoned test images (BackdoorBench keeps those of the non-target classes).
    """

    record_dir: Path
    model: Normalized
    model_name: str
    num_classes: int
    img_size: Tuple[int, int, int]
    clean_data: str
    attack: Optional[str]
    target: Optional[int]
    clean_train: ImageSet
    clean_test: ImageSet
    bd_train: Optional[ImageSet]
    bd_test: ImageSet


def _confined(path: Path, roots: Sequence[Path], what: str) -> Path:
    """``path`` with its symlinks resolved; a ValueError naming ``what`` and ``path`` when that
    lies in none of the folders ``roots`` (themselves resolved)."""
    real = Path(os.path.realpath(path))
    if not any(real == root or root in real.parents for root in roots):
        raise ValueError(f"{what} is {path}, which resolves to {real}, outside "
                         f"{' and '.join(str(root) for root in roots)}; bdfast reads no file there")
    return real


def _record_file(record_dir: Path, name: str) -> Optional[Path]:
    """The record's own file ``name`` with its symlinks resolved, or None when it has none."""
    path = record_dir / name
    if not path.is_file():
        return None
    return _confined(path, [Path(os.path.realpath(record_dir))], f"the record's {name}")


def _record_content(record_dir: Path) -> Tuple[Path, Dict[str, Any]]:
    """``(path, content)`` of the record's attack_result.pt, a dict with every key BackdoorBench
    writes."""
    path = record_dir / "attack_result.pt"
    real = _record_file(record_dir, "attack_result.pt")
    if real is None:
        raise FileNotFoundError(f"attack_result.pt was not found in {record_dir}, which should be "
                                "the folder BackdoorBench wrote for the attack, record/<name>")
    content = _load_safely(real)
    missing = [key for key in _RECORD_KEYS if key not in content] \
        if isinstance(content, dict) else list(_RECORD_KEYS)
    if missing:
        raise ValueError(f"{path} is not a BackdoorBench attack result: it lacks {missing}")
    return path, content


def _check_types(content: Mapping[str, Any], path: Path) -> None:
    """A ValueError naming the first key of the record whose value is not of the type
    BackdoorBench writes there."""
    for key, (kinds, wanted) in _RECORD_TYPES.items():
        value = content[key]
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise ValueError(f"{key} in {path} is a {type(value).__name__}, where BackdoorBench "
                             f"writes {wanted}")
    for key, value in content["model"].items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ValueError(f"the model in {path} maps {key!r} to a {type(value).__name__}, "
                             "where a state_dict maps names to tensors")


def _image_size(value: Any, path: Path) -> Tuple[int, int, int]:
    """The record's img_size as ``(H, W, C)``, C being 1 or 3 and H x W within
    :data:`IMAGE_PIXEL_LIMIT`."""
    try:
        height, width, channels = (operator.index(v) for v in value)
    except (TypeError, ValueError):
        height = width = channels = 0
    if channels not in (1, 3) or min(height, width) < 1 or height * width > IMAGE_PIXEL_LIMIT:
        raise ValueError(f"img_size in {path} must be (height, width, channels) with 1 or 3 "
                         f"channels and at most {IMAGE_PIXEL_LIMIT} pixels, got {value!r}")
    return height, width, channels


def _label(value: Any, num_classes: int) -> Optional[int]:
    """``value`` as a class below ``num_classes``, or None when it is not one."""
    try:
        label = operator.index(value)
    except TypeError:
        return None
    return label if 0 <= label < num_classes else None


@dataclass(frozen=True)
class _PoisonPlan:
    """A poisoned data set's state, checked before any image is read.

    Attributes:
        index: int64 ``[n]``, the images of the clean set it holds, in order.
        flags: ``[N]`` over the whole clean set, 1 for a poisoned image.
        files: the PNG file (symlinks resolved) of each poisoned image, in the set's order.
        labels: ``(poisoned label, true label)`` of each poisoned image, in the same order.
    """

    index: np.ndarray
    flags: np.ndarray
    files: List[Path]
    labels: List[Tuple[int, int]]


def _poison_plan(state: Any, what: str, path: Path, bb_root: Path, roots: Sequence[Path],
                 num_classes: int) -> _PoisonPlan:
    """The plan of the poisoned data set whose state BackdoorBench keeps under ``what``: the
    clean images at ``original_index_array``, with those ``poison_indicator`` marks replaced by
    the PNG files (and labels) of ``bd_data_container``, whose paths must lie in ``roots``."""
    try:
        entries = state["bd_data_container"]["data_dict"]
        index = np.asarray(state["original_index_array"])
        flags = np.asarray(state["poison_indicator"], dtype=np.float64).reshape(-1)
        if not isinstance(entries, dict):
            raise TypeError("data_dict")
        if index.dtype.kind not in "iu":
            raise TypeError("original_index_array")
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"the {what} of {path} is not the state of a BackdoorBench poisoned "
                         f"data set (reading {error} failed)") from None
    index = index.astype(np.int64).reshape(-1)
    outside = index[(index < 0) | (index >= len(flags))]
    if len(outside):
        raise ValueError(f"the {what} of {path} holds image {outside[0]} of a data set of "
                         f"{len(flags)} images")
    files: List[Path] = []
    labels: List[Tuple[int, int]] = []
    for position in np.flatnonzero(flags[index] == 1):
        sample = int(index[position])
        what_image = f"image {sample} of the {what} of {path}"
        file, pair = _poisoned_entry(entries.get(sample), what_image, num_classes)
        # BackdoorBench writes the paths relative to its own folder, where it runs.
        real = _confined(bb_root / file, roots, what_image)
        if not real.is_file():
            raise FileNotFoundError(f"poisoned image of the {what} {(bb_root / file).name} was "
                                    f"not found in {(bb_root / file).parent}")
        files.append(real)
        labels.append(pair)
    return _PoisonPlan(index, flags, files, labels)


def _poisoned_entry(entry: Any, what: str, num_classes: int) -> Tuple[str, Tuple[int, int]]:
    """The file name and ``(poisoned label, true label)`` that bd_data_container's ``entry``
    holds for the poisoned image ``what``."""
    info = entry.get("other_info") if isinstance(entry, dict) else None
    pair = [_label(v, num_classes) for v in info[:2]] \
        if isinstance(info, (list, tuple)) and len(info) >= 2 else [None]
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or None in pair:
        raise ValueError(f"{what} is marked poisoned, but bd_data_container has no file name "
                         f"and two labels below {num_classes} for it")
    return entry["path"], (pair[0], pair[1])


def _poisoned_set(plan: _PoisonPlan, clean: ImageSet, what: str, path: Path,
                  size: Tuple[int, int, int]) -> ImageSet:
    """The poisoned data set ``plan`` describes, over the clean set ``clean``."""
    if len(plan.flags) != len(clean):
        raise ValueError(f"the {what} of {path} indexes a data set of {len(plan.flags)} images, "
                         f"but the one under data_root has {len(clean)}; data_root must hold "
                         "the data set the attack used")
    chosen = torch.from_numpy(plan.index)
    images = clean.images[chosen].clone()
    labels = clean.labels[chosen].clone()
    original = labels.clone()
    marked = plan.flags[plan.index] == 1
    for position, file, pair in zip(np.flatnonzero(marked), plan.files, plan.labels):
        images[position] = _read_image(file, size, f"poisoned image of the {what}",
                                       _RECORD_FORMATS)
        labels[position], original[position] = pair
    return ImageSet(images, labels, original, torch.from_numpy(marked))


def _attack_name(info: Optional[Path]) -> Optional[str]:
    """The ``attack`` of the attack's settings, which BackdoorBench saves as info.pickle (the
    file ``info``, if any)."""
    if info is None:
        return None
    try:
        settings = _load_safely(info)
    except ValueError:  # the name is a label for reports; a record reads without it
        return None
    name = settings.get("attack") if isinstance(settings, dict) else None
    return name if isinstance(name, str) else None


def load_record(record_dir: PathLike, data_root: PathLike,
                bb_root: Optional[PathLike] = None) -> BackdoorBenchRecord:
    """Read a BackdoorBench attack record: its model and its clean and poisoned data sets.

    Args:
        record_dir: the attack's folder, ``record/<name>``, holding ``attack_result.pt``.
        data_root: the folder the attack read its data set from, BackdoorBench's
            ``data/<data set>`` (e.g. ``data/cifar10`` holding ``cifar-10-batches-py``); see
            :data:`DATASETS` and docs/backdoorbench.md for each data set's files. Nothing is
            downloaded.
        bb_root: the BackdoorBench folder, against which the record's relative PNG paths are
            resolved; by default the folder above ``record``. The PNG files must lie (symlinks
            resolved) in it or in ``record_dir``.

    Returns:
        A :class:`BackdoorBenchRecord`. Raises FileNotFoundError for a missing file and
        ValueError for a record, model, image or data set bdfast cannot or will not read (see
        "Records from elsewhere" in docs/backdoorbench.md), in one sentence each; what the
        record holds is checked before any image or data set file is read. Warns, in one line,
        when the model's tensors are loaded by position.
    """
    record_dir = Path(record_dir)
    root = Path(data_root)
    path, content = _record_content(record_dir)
    info = _record_file(record_dir, "info.pickle")
    bb_root = Path(bb_root) if bb_root is not None else record_dir.resolve().parent.parent
    _check_types(content, path)
    name = content["clean_data"]
    if name not in DATASETS:
        raise ValueError(f"the record's data set {name!r} is not supported; bdfast reads "
                         f"{', '.join(DATASETS)}")
    spec = DATASETS[name]
    num_classes = int(content["num_classes"])
    if num_classes != spec.classes:
        raise ValueError(f"num_classes in {path} is {num_classes}, but {name} has "
                         f"{spec.classes} classes")
    size = _image_size(content["img_size"], path)
    network = _build_network(content["model_name"], num_classes,
                             _without_module_prefix(content["model"]), f"the model in {path}",
                             by_position=True)
    roots = [Path(os.path.realpath(record_dir)), Path(os.path.realpath(bb_root))]
    train_plan = None if content["bd_train"] is None else _poison_plan(
        content["bd_train"], "bd_train", path, bb_root, roots, num_classes)
    test_plan = _poison_plan(content["bd_test"], "bd_test", path, bb_root, roots, num_classes)

    clean_train = ImageSet(*spec.read(root, True, size))
    clean_test = ImageSet(*spec.read(root, False, size))
    bd_train = None if train_plan is None else _poisoned_set(
        train_plan, clean_train, "bd_train", path, size)
    bd_test = _poisoned_set(test_plan, clean_test, "bd_test", path, size)
    targets = bd_test.labels.unique()
    return BackdoorBenchRecord(
        record_dir=record_dir, model=Normalized(network, spec.mean, spec.std).eval(),
        model_name=content["model_name"], num_classes=num_classes, img_size=size,
        clean_data=name, attack=_attack_name(info),
        target=int(targets[0]) if len(targets) == 1 else None, clean_train=clean_train,
        clean_test=clean_test, bd_train=bd_train, bd_test=bd_test)


def clean_subset(clean_train: ImageSet, ratio: float = DEFAULT_CLEAN_RATIO,
                 seed: int = 0) -> Tuple[Tensor, Tensor]:
    """The defender's clean images, as BackdoorBench's defenses get them: ``int(N * ratio)``
    images of the clean training set, drawn without replacement (with numpy's generator seeded
    by ``seed``, so not the very images BackdoorBench's own seeded draw picks).

    Returns ``(x [n, C, H, W] float32 in [0, 1], y [n] int64)`` in the set's order.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be a fraction in (0, 1], got {ratio!r}")
    count = int(len(clean_train) * ratio)
    if count < 1:
        raise ValueError(f"ratio {ratio} of the {len(clean_train)} clean training images is "
                         "no image at all")
    chosen = np.random.default_rng(seed).choice(len(clean_train), count, replace=False)
    return clean_train.tensors(np.sort(chosen))


def _predictions(model: nn.Module, images: ImageSet, batch_size: int) -> Tensor:
    parts = [predict(model, x, batch_size) for x, _ in images.batches(batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def evaluate_record(model: nn.Module, record: BackdoorBenchRecord,
                    batch_size: int = 256) -> Dict[str, float]:
    """BackdoorBench's three numbers for ``model`` (images in [0, 1] -> logits), as fractions:

    - ``acc``: accuracy on the clean test set;
    - ``asr``: the share of the poisoned test images classified as their poisoned label;
    - ``ra``: the share of the poisoned test images classified as their true class.

    ASR and RA are NaN when the record has no poisoned test image. The model runs in eval mode;
    every module's train/eval flag is restored afterwards.
    """
    with eval_mode(model):
        clean = _predictions(model, record.clean_test, batch_size)
        triggered = _predictions(model, record.bd_test, batch_size)
    acc = (clean == record.clean_test.labels).float().mean().item()
    if len(triggered) == 0:
        return {"acc": acc, "asr": float("nan"), "ra": float("nan")}
    return {"acc": acc,
            "asr": (triggered == record.bd_test.labels).float().mean().item(),
            "ra": (triggered == record.bd_test.original_labels).float().mean().item()}


def save_defense_result(record_dir: PathLike, method: str, model: nn.Module,
                        metrics: Mapping[str, float]) -> Path:
    """Write ``model``, cleaned by ``method``, where BackdoorBench's tools look for a defense.

    ``record_dir/defense/bdfast-<method>/defense_result.pt`` holds ``model_name``,
    ``num_classes`` and ``model``, the network's state_dict (without the :class:`Normalized`
    wrapper), as BackdoorBench's own defenses save them; ``bdfast-<method>_df_summary.csv``
    beside it holds ``metrics`` (``acc``, ``asr`` and ``ra``, as :func:`evaluate_record` gives
    them) in its columns ``test_acc``, ``test_asr`` and ``test_ra``. Returns the path of
    ``defense_result.pt``. Raises ValueError, before writing anything, when the state_dict does
    not fit the record's model.
    """
    if not isinstance(method, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", method):
        raise ValueError(f"method must be a name of letters, digits, '_', '.' or '-', got "
                         f"{method!r}")
    missing = [key for key in ("acc", "asr", "ra") if key not in metrics]
    if missing:
        raise ValueError(f"metrics lacks {missing}; give the dict evaluate_record returns")
    record_dir = Path(record_dir)
    path, content = _record_content(record_dir)
    network = model.model if isinstance(model, Normalized) else model
    state = network.state_dict()  # an OrderedDict whose _metadata some loaders need
    for key, value in state.items():
        state[key] = value.detach().cpu()
    _build_network(content["model_name"], int(content["num_classes"]), state,
                   f"the model to save for {path}")

    folder = record_dir / "defense" / f"bdfast-{method}"
    folder.mkdir(parents=True, exist_ok=True)
    result = folder / "defense_result.pt"
    torch.save({"model_name": content["model_name"], "num_classes": int(content["num_classes"]),
                "model": state}, result)
    with open(folder / f"bdfast-{method}_df_summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        # pandas' DataFrame.to_csv layout, which BackdoorBench's summaries have: an unnamed
        # index column, then one column per metric.
        writer.writerow(["", "test_acc", "test_asr", "test_ra"])
        writer.writerow([0, float(metrics["acc"]), float(metrics["asr"]), float(metrics["ra"])])
    return result
