"""The efficacy acceptance cases, written once: the tests parametrize over ``CASES`` and
``scripts/efficacy_margin.py`` runs the same cases over seeds, thread counts and instruction sets.

A case trains (or takes from a cache) a backdoored lab model of the digits set for one seed, runs
one defense with fixed settings, and measures ACC / ASR on the test split before and after.
``Case.margin`` is the distance to the nearest bound: positive means it passes, and the margin
script reports the smallest one over all variants.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from bdfast import attacks, models
from bdfast.bcu import bcu_cleanse
from bdfast.data import Digits, tensor_loader
from bdfast.dde import dde_prune
from bdfast.mbns import mbns_prune
from bdfast.medic import medic_clone
from bdfast.metrics import evaluate
from bdfast.trainer import train

Metrics = Dict[str, float]


def poisoned_train_set(digits: Digits, attack_name: str, seed: int):
    """``digits.train`` poisoned by the attack at rate 0.1: ``(x, y, poisoned_mask)``."""
    attack = attacks.get(attack_name, num_classes=digits.num_classes)
    return attack.poison(*digits.train, rate=0.1, seed=seed)


def train_backdoored(digits: Digits, attack_name: str, arch: str, seed: int) -> nn.Module:
    """A model of ``arch`` trained with ``bdfast.train`` defaults on the poisoned training set;
    ``seed`` fixes the poisoning, the initialisation and the training. In eval mode."""
    x, y, _ = poisoned_train_set(digits, attack_name, seed)
    factory: Callable[..., nn.Module] = getattr(models, arch)
    torch.manual_seed(seed)
    model = factory(num_classes=digits.num_classes, in_channels=x.shape[1])
    return train(model, x, y, seed=seed, progress=False)


@dataclass(frozen=True)
class Case:
    """One acceptance check.

    ``defense`` is ``"none"`` (the lab model itself must carry the backdoor: ACC >= ``acc_min``
    and ASR >= ``asr_min``) or a defense run with ``options`` that must leave ASR <= ``asr_max``
    (not checked when None) and ACC >= ACC before - ``max_acc_drop``.
    """

    defense: str
    attack: str
    arch: str = "digits_cnn"
    options: Dict[str, Any] = field(default_factory=dict)
    asr_max: Optional[float] = 0.10
    max_acc_drop: float = 0.03
    acc_min: float = 0.90
    asr_min: Optional[float] = 0.90

    @property
    def name(self) -> str:
        return f"{self.defense}/{self.attack}/{self.arch}"

    @property
    def key(self) -> str:
        """The name and every setting: what a cached result of this case is filed under."""
        return json.dumps([self.name, self.options, self.asr_max, self.max_acc_drop,
                           self.acc_min, self.asr_min], sort_keys=True)

    def margin(self, before: Metrics, after: Metrics) -> float:
        """The smallest distance to a bound (>= 0 passes), in ACC / ASR units."""
        if self.defense == "none":
            gaps = [after["acc"] - self.acc_min]
            if self.asr_min is not None:
                gaps.append(after["asr"] - self.asr_min)
            return min(gaps)
        gaps = [after["acc"] - (before["acc"] - self.max_acc_drop)]
        if self.asr_max is not None:
            gaps.append(self.asr_max - after["asr"])
        return min(gaps)

    def run(self, digits: Digits, teacher: nn.Module, seed: int) -> Tuple[Metrics, Metrics]:
        """``(metrics before, metrics after)`` of this case on ``teacher``, a model trained by
        :func:`train_backdoored` with the same ``seed`` (the teacher is not modified)."""
        attack = attacks.get(self.attack, num_classes=digits.num_classes)
        before = evaluate(teacher, *digits.test, attack=attack)
        if self.defense == "none":
            return before, before
        options = dict(self.options, progress=False)
        if self.defense == "medic":
            loader = tensor_loader(*digits.clean, batch_size=64, shuffle=True, seed=seed)
            model = medic_clone(teacher, loader, seed=seed, **options)
        elif self.defense == "bcu":
            loader = tensor_loader(digits.clean[0], batch_size=64, shuffle=True, seed=seed)
            model = bcu_cleanse(teacher, loader, seed=seed, **options)
        elif self.defense == "dde":
            # DDE reads the attacker's poisoned training set, as in the paper.
            x_train, _, _ = poisoned_train_set(digits, self.attack, seed)
            model = dde_prune(teacher, tensor_loader(x_train, batch_size=256), **options).model
        elif self.defense == "mbns":
            model = mbns_prune(teacher, tensor_loader(digits.clean[0], batch_size=256),
                               **options).model
        else:
            raise ValueError(f"unknown defense {self.defense!r}")
        return before, evaluate(model, *digits.test, attack=attack)


def assert_case(case: Case, before: Metrics, after: Metrics) -> None:
    """The test-side check of one case, with the numbers in the failure message."""
    margin = case.margin(before, after)
    assert math.isfinite(margin) and margin >= 0, (
        f"{case.name}: ACC {before['acc']:.3f} -> {after['acc']:.3f}, "
        f"ASR {before['asr']:.3f} -> {after['asr']:.3f} (margin {margin:+.3f})")


# MEDIC and BCU run with the library's defaults, which the efficacy matrix chose
# (docs/medic.md, docs/bcu.md): what a user calls is what these cases and `make margin` check.
MEDIC: Dict[str, Any] = {}
BCU: Dict[str, Any] = {}

CASES = [
    Case("none", "badnets"), Case("none", "blended"), Case("none", "wanet"),
    # SIG is clean-label with a faint signal: its ASR is reported, not required.
    Case("none", "sig", asr_min=None),
    *[Case("medic", attack, arch, MEDIC) for arch in ("digits_cnn", "vgg_small")
      for attack in ("badnets", "blended")],
    *[Case("bcu", attack, arch, BCU) for arch in ("digits_cnn", "vgg_small")
      for attack in ("badnets", "blended")],
    *[Case(defense, "badnets", arch, dict(u=3.0), asr_max=None, max_acc_drop=max_acc_drop)
      for defense, max_acc_drop in (("dde", 0.03), ("mbns", 0.10))
      for arch in ("digits_cnn", "vgg_small")],
]
