"""The backdoor lab: data, attacks, models and a trainer that make backdoored models to try the
defenses on, the metrics that judge them, the demo, the report and the acceptance cases. No
defense imports from here (docs/architecture.md).

This module is the lab's one home for backdoored models: poison a lab data set, train a lab model
on it, and cache the result under a key that names everything that shapes its weights.

The demo, the test suite, the efficacy matrix, the margin script and the benchmarks all get their
backdoored models from :func:`backdoored`, so a change to the trainer, the models, the attacks or
the data retrains every cached model at once (the key holds :func:`source_hash` of those files).

A model's weights also change with torch's thread count and the CPU's instruction set (conv and
GEMM kernels round differently on AVX2 and AVX-512), so both are part of the key as well.
"""
from __future__ import annotations

import functools
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdfast.lab import attacks, models
from bdfast.lab.data import LabData, load_digits, load_fashion_mnist
from bdfast.lab.trainer import train

__all__ = ["DATA", "ARCHS", "RECIPES", "VIEWS", "LabModel", "lab_data", "build_model", "backdoored",
           "source_hash", "code_version", "POISON_RATE", "fmnist_spare_images"]

PACKAGE = Path(__file__).resolve().parents[1]
CHECKOUT = PACKAGE.parent

DATA = ("digits", "fmnist", "fmnist28")
# BatchNorm nets first, then the nets without it (GroupNorm, LayerNorm, no normalisation), then
# the transformer-style nets (LayerNorm on tokens or on channels-last maps).
ARCHS = ("digits_cnn", "vgg_small", "preact_resnet18", "wrn16_1", "gn_resnet", "convnext_lab",
         "plain_cnn", "vit_lab", "convnext_cl_lab")
POISON_RATE = 0.1
# Per-net training recipes, overriding bdfast.train's defaults (which every other net keeps).
# The ViT learns slowly from 1,077 images: with the defaults (30 epochs of SGD at lr 0.015) it
# reached 0.902 clean accuracy on the digits (badnets, seed 0, 2 threads), with lr 0.03 0.878,
# with AdamW (weight decay 0.05) at lr 1e-3 0.871 and at 3e-3 0.878; 60 epochs of the default
# SGD reached 0.964 (1 thread).
RECIPES: Dict[str, Dict[str, Any]] = {"vit_lab": {"epochs": 60}}
# The lab's PreAct-ResNet-18 has a quarter of the paper's channels (976 BN channels), so that the
# whole efficacy matrix fits a 2-core machine.
PREACT_WIDTH = 16

# What a lab model's weights depend on besides its key's settings.
MODEL_SOURCES = ("lab/trainer.py", "lab/models.py", "lab/attacks.py", "lab/data.py",
                 "lab/__init__.py", "defenses/augment.py")
SOURCE_SUFFIXES = (".py", ".cpp", ".h", ".cu", ".cuh")


def source_hash(paths: Iterable[Union[str, Path]]) -> str:
    """A 16-hex-digit hash of the named files (folders: every source file under them, sorted),
    their names included (relative to the folder that holds each given path), so a renamed file
    counts as a change.

    Relative paths are read from the package folder (``"lab/trainer.py"``) or, when they name the
    checkout's top level (``"csrc"``), from there."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        if not path.is_absolute():
            path = PACKAGE / path if (PACKAGE / path).exists() else CHECKOUT / path
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in files:
            if file.is_file() and file.suffix in SOURCE_SUFFIXES:
                digest.update(str(file.relative_to(path.parent)).encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """:func:`source_hash` of everything that computes a defense: the package, and the C++/CUDA
    sources when running from a checkout. Results record it, so a row says which code made it."""
    return source_hash([PACKAGE] + ([CHECKOUT / "csrc"] if (CHECKOUT / "csrc").is_dir() else []))


def _fmnist_16(x: Tensor) -> Tensor:
    return F.interpolate(x, size=(16, 16), mode="area").clamp_(0, 1)


@functools.lru_cache(maxsize=2)
def lab_data(name: str) -> LabData:
    """A lab data set with fixed splits (the seed of a lab model varies its poisoning,
    initialisation and training, never the split).

    - ``"digits"``: scikit-learn's 1,797 handwritten digits at 16x16 (:func:`load_digits`):
      1,077 train, 270 clean (the defender's set), 450 test.
    - ``"fmnist"``: Fashion-MNIST (Debian's dataset-fashion-mnist): a stratified 2,000 training
      images to poison and train on, 500 clean, 1,000 test, area-downsampled to 16x16.
    - ``"fmnist28"``: Fashion-MNIST at its own 28x28: 5,000 training images, 500 clean, 2,000
      test. A student cloned from 500 images of a teacher trained on 5,000 at full size is
      the harder case of docs/efficacy.md; 5,000 and not all 60,000 so that a CNN teacher
      trains in minutes on 2 cores.
    """
    if name == "digits":
        return load_digits()
    if name == "fmnist28":
        return load_fashion_mnist(train_size=5000, clean_size=500, test_size=2000, seed=0)
    if name == "fmnist":
        full = load_fashion_mnist(train_size=2000, clean_size=500, test_size=1000, seed=0)
        return LabData(train=(_fmnist_16(full.train[0]), full.train[1]),
                       clean=(_fmnist_16(full.clean[0]), full.clean[1]),
                       test=(_fmnist_16(full.test[0]), full.test[1]), num_classes=10, size=16)
    raise ValueError(f"unknown lab data set {name!r}; choose from {list(DATA)}")


@functools.lru_cache(maxsize=1)
def fmnist_spare_images() -> Tensor:
    """Fashion-MNIST training images in neither the ``"fmnist"`` lab's clean split nor its
    attacker's 2,000, at 16x16, in a fixed random order (more unlabeled images for BCU)."""
    taken = {x.numpy().tobytes() for x in lab_data("fmnist").train[0]}
    rest = _fmnist_16(load_fashion_mnist(train_size=None, clean_size=500, seed=0).train[0])
    spare = torch.stack([x for x in rest if x.numpy().tobytes() not in taken])
    return spare[torch.randperm(len(spare), generator=torch.Generator().manual_seed(0))]


def _rgb32(x: Tensor) -> Tensor:
    """1 x 16 x 16 images -> 3 x 32 x 32 (bilinear), for the 32x32 RGB architectures."""
    return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1) \
        .repeat(1, 3, 1, 1).contiguous()


# How a model sees the images: poisoning happens on the data set's own images, then the view.
VIEWS: Dict[str, Callable[[Tensor], Tensor]] = {"native": lambda x: x, "rgb32": _rgb32}


def build_model(arch: str, num_classes: int, in_channels: int, image_size: int = 16
                ) -> nn.Module:
    """A fresh lab model of ``arch`` (one of :data:`ARCHS`) for ``image_size`` square images
    (only the ViT's shape depends on it: its position embedding has a row per patch)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown lab architecture {arch!r}; choose from {list(ARCHS)}")
    if arch == "preact_resnet18":
        return models.preact_resnet18(num_classes, in_channels, width=PREACT_WIDTH)
    if arch == "vit_lab":
        return models.vit_lab(num_classes, in_channels, image_size=image_size)
    return getattr(models, arch)(num_classes=num_classes, in_channels=in_channels)


@dataclass
class LabModel:
    """A backdoored lab model and everything it was made from.

    Attributes:
        model: the trained model, in eval mode.
        data: the data set's splits, seen through the model's view (``clean`` is the
            defender's set, ``test`` measures ACC / ASR).
        poisoned: ``(x, y, poisoned_mask)``: the training set the model was trained on.
        attack: the attack, to measure ASR with :func:`bdfast.evaluate`.
        view: how the model sees images (:data:`VIEWS`); apply it after the attack's trigger.
        key: what its cache file is named after.
    """

    model: nn.Module
    data: LabData
    poisoned: Tuple[Tensor, Tensor, Tensor]
    attack: attacks.Attack
    view: Callable[[Tensor], Tensor]
    key: str


def backdoored(data: str, arch: str, attack: str, seed: int, *, rate: float = POISON_RATE,
               epochs: Optional[int] = None, view: str = "native",
               cache: Union[str, Path, None] = None, device: Union[str, torch.device, None] = None,
               progress: bool = False) -> LabModel:
    """The lab model of ``arch`` trained with :func:`bdfast.train`'s defaults (with the net's
    :data:`RECIPES` entry, if it has one) on lab data set ``data`` (:func:`lab_data`) poisoned
    by ``attack`` at ``rate``.

    ``seed`` fixes the poisoning, the initialisation and the training; ``epochs`` overrides the
    trainer's default. With ``cache`` (a folder), the weights are read from there when a model
    with the same key exists, and written there otherwise (atomically, so parallel runs are
    safe). The key holds every argument that changes the weights, torch's thread count, CPU
    capability and version, and :func:`source_hash` of the lab's sources.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose from {list(VIEWS)}")
    splits = lab_data(data)
    trigger = attacks.get(attack, num_classes=splits.num_classes)
    x, y, mask = trigger.poison(*splits.train, rate=rate, seed=seed)
    see = VIEWS[view]
    x = see(x)
    seen = LabData(train=(see(splits.train[0]), splits.train[1]),
                   clean=(see(splits.clean[0]), splits.clean[1]),
                   test=(see(splits.test[0]), splits.test[1]),
                   num_classes=splits.num_classes, size=x.shape[-1])
    torch.manual_seed(seed)
    model = build_model(arch, splits.num_classes, x.shape[1], image_size=x.shape[-1])
    if device is not None:
        model.to(device)
    key = (f"{data}-{arch}-{attack}-s{seed}-r{rate:g}-e{epochs or 'default'}-{view}-"
           f"t{torch.get_num_threads()}-{torch.backends.cpu.get_cpu_capability()}-"
           f"torch{torch.__version__.split('+')[0]}-{source_hash(MODEL_SOURCES)}")
    path = Path(cache) / f"{key}.pt" if cache is not None else None
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        start = time.perf_counter()
        options = dict(RECIPES.get(arch, {}))
        if epochs is not None:
            options["epochs"] = epochs
        train(model, x, y, seed=seed, device=device, progress=progress, **options)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, partial)
            os.replace(partial, path)
            if progress:
                print(f"trained {key} in {time.perf_counter() - start:.0f} s", flush=True)
    return LabModel(model=model.eval(), data=seen, poisoned=(x, y, mask), attack=trigger,
                    view=see, key=key)
