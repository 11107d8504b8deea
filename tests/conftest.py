"""Shared fixtures: the digits data and cached backdoored models; the ``gpu`` marker."""
from __future__ import annotations

import copy
import time
from typing import Callable, Dict, Tuple

import pytest
import torch
from torch import nn

from bdfast import attacks, models
from bdfast.data import Digits, load_digits
from bdfast.trainer import train


# CPU reductions split their work by thread, so the models trained here (and the acceptance
# numbers the defense tests check) change in the last bits with the thread count. The tuned
# settings were measured at 2 threads; pinning them keeps a run on a bigger machine the same.
TEST_THREADS = 2


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(TEST_THREADS)
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits() -> Digits:
    """``bdfast.data.load_digits()`` with its defaults (16x16, seed 0)."""
    return load_digits()


class BackdooredModels:
    """Callable ``(attack_name, arch="digits_cnn") -> nn.Module``: a model of ``arch`` trained with
    ``bdfast.train`` defaults and seed 0 on ``digits.train`` poisoned by the attack (rate 0.1,
    seed 0), in eval mode. Each model is trained once per session; every call returns a fresh
    deep copy, so a test may modify what it gets. ``seconds[(attack_name, arch)]`` is how long the
    training took."""

    def __init__(self, digits: Digits):
        self.digits = digits
        self.cache: Dict[Tuple[str, str], nn.Module] = {}
        self.seconds: Dict[Tuple[str, str], float] = {}

    def __call__(self, attack_name: str, arch: str = "digits_cnn") -> nn.Module:
        key = (attack_name, arch)
        if key not in self.cache:
            attack = attacks.get(attack_name, num_classes=self.digits.num_classes)
            x, y, _ = attack.poison(*self.digits.train, rate=0.1, seed=0)
            factory: Callable[..., nn.Module] = getattr(models, arch)
            torch.manual_seed(0)
            model = factory(num_classes=self.digits.num_classes, in_channels=x.shape[1])
            start = time.perf_counter()
            self.cache[key] = train(model, x, y, seed=0, progress=False)
            self.seconds[key] = time.perf_counter() - start
        return copy.deepcopy(self.cache[key])


@pytest.fixture(scope="session")
def backdoored_model(digits: Digits) -> BackdooredModels:
    """See :class:`BackdooredModels`."""
    return BackdooredModels(digits)
