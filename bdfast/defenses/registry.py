"""The defenses, each described once: what it is called, what data it wants, what it returns,
and :func:`run`, the one place that hands each defense its data.

The CLI (``bdfast clean --method``), the demo, the efficacy matrix, the acceptance cases and the
benchmarks all run defenses through :func:`run`; adding a defense means writing its module and
one line here. Two baselines sit beside the defenses for comparison tables (``none`` and
``finetune``); :func:`names` leaves them out unless asked.
"""
from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdfast._utils import (check_training_inputs, resolve_device, seed_everything, seeded_generator,
                           steps_per_epoch)
from bdfast.defenses.augment import RandomCrop
from bdfast.defenses.bcu import bcu_cleanse
from bdfast.defenses.checkpoint import Checkpoint, check_options as check_checkpoint
from bdfast.defenses.dde import dde_prune
from bdfast.defenses.distill import fit
from bdfast.defenses.mbns import mbns_prune
from bdfast.defenses.medic import medic_clone
from bdfast.loaders import tensor_loader
from bdfast.defenses.pruning import PruneResult

__all__ = ["Defense", "DEFENSES", "Outcome", "run", "defense_loader", "names", "get",
           "cleaned_model", "data_help", "DataSpec"]

# Batches a defense gets when :func:`run` builds its loader from tensors: the training defenses'
# (shuffled, seeded) and the statistics passes'.
TRAIN_BATCH = 64
STATISTICS_BATCH = 256

# A data set for :func:`run`: a loader (used as given), images ``x [N, C, H, W]``, or ``(x, y)``.
DataSpec = Union[Iterable, Tensor, Tuple[Tensor, Optional[Tensor]], None]


@dataclass(frozen=True)
class Defense:
    """One defense.

    Attributes:
        name: its name in the CLI, the demo and reports.
        run: ``run(model, loader, **options)``, the public function.
        data: "clean" (a small clean set), "training" (the model's own, possibly poisoned,
            training images) or "none" (the ``none`` baseline).
        uses_labels: whether it reads labels from ``(x, y)`` batches: MEDIC trains on them,
            MBNS's ``u="auto"`` validates on them (its statistics ignore them); BCU and DDE
            need none.
        trains: whether it trains a model (then its loader is shuffled and seeded, and it
            takes ``seed`` and ``epochs``), or only computes statistics and prunes.
        returns: "model" (an ``nn.Module``) or "prune" (a :class:`~bdfast.PruneResult` with
            ``.model`` and ``.report``).
        baseline: a comparison point, not a defense (hidden from :func:`names` and the CLI).
        takes_tensors: its ``run`` takes ``(model, x, y, **options)`` instead of a loader.
    """

    name: str
    run: Callable[..., Any]
    data: str
    uses_labels: bool
    trains: bool
    returns: str
    baseline: bool = False
    takes_tensors: bool = False

    def options(self) -> Dict[str, inspect.Parameter]:
        """The keyword options of :attr:`run`, with their defaults and annotations."""
        return {name: p for name, p in inspect.signature(self.run).parameters.items()
                if p.kind is p.KEYWORD_ONLY}


def _no_defense(model: nn.Module, *, progress: bool = True) -> nn.Module:
    """The ``none`` baseline: the model as it is (``progress`` is accepted and unused, as the
    baseline has no work to show)."""
    return model


def _finetune(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int = 20, lr: float = 0.01,
              batch_size: int = TRAIN_BATCH, device: Any = None, seed: Optional[int] = None,
              progress: bool = True, checkpoint: Optional[str] = None,
              resume: bool = False) -> nn.Module:
    """The ``finetune`` baseline: a copy of ``model`` trained on the clean set ``(x, y)`` with
    cross-entropy, through the defenses' training loop (:func:`bdfast.defenses.distill.fit`).

    The recipe is :func:`bdfast.train`'s at a fine-tuning learning rate: SGD with Nesterov
    momentum 0.9 and weight decay 5e-4, a per-step cosine schedule from ``lr`` to 0, batches of
    ``batch_size`` reshuffled every epoch (a trailing batch of one image is left out, for
    BatchNorm), each image shifted by up to ``max(1, min(H, W) // 8)`` pixels (zero-filled, no
    flip). The order and the shifts come from one generator seeded with ``seed``, drawn in
    :func:`bdfast.train`'s order, so a seed gives the model that trainer gives. ``checkpoint``
    (a folder) and ``resume`` make the run resumable (docs/long-runs.md). Returns the copy in
    eval mode, on ``device`` (default: the model's). No collapse guard: the loss is the labels'
    own cross-entropy, so a run that stops matching them shows in its loss.
    """
    check_training_inputs(model, x, y, epochs=epochs, batch_size=batch_size)
    if not lr > 0:  # inf passes; its first update then fails with a FloatingPointError
        raise ValueError(f"lr must be positive, got {lr!r}")
    check_checkpoint(checkpoint, resume)
    options = dict(epochs=epochs, lr=lr, batch_size=batch_size, device=device, seed=seed,
                   progress=progress, checkpoint=checkpoint, resume=resume)
    seed_everything(seed)
    generator = seeded_generator(seed)
    device = resolve_device(device, model)
    student = copy.deepcopy(model).to(device)
    loader = _Reshuffled(x, y, batch_size, generator)
    shift = RandomCrop(flip=False, padding=max(1, min(x.shape[-2:]) // 8), generator=generator)
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)

    def step(net: nn.Module, xb: Tensor, yb: Optional[Tensor], epoch: int) -> Tensor:
        return F.cross_entropy(net(xb), yb)

    saver = Checkpoint.for_run(checkpoint, resume, defense="finetune", teacher=model,
                               first_batch=x[:batch_size], options=options)
    fit(student, loader, step, optimizer, epochs=epochs, device=device, schedule="step",
        amp=False, progress=progress, augment=shift, desc="finetune", checkpoint=saver)
    return student.eval()


class _Reshuffled:
    """The batches ``(x [b, ...], y [b])`` of :func:`_finetune`, in an order drawn from
    ``generator`` at the start of every pass (where :func:`bdfast.train` draws it); a trailing
    batch of one image is left out. :func:`bdfast.defenses.distill.fit` saves and restores
    ``generator`` with a checkpoint."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator):
        self.x, self.y, self.batch_size, self.generator = x, y, batch_size, generator
        self.steps = steps_per_epoch(len(x), batch_size)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=self.generator)
        for step in range(self.steps):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield self.x[idx.to(self.x.device)], self.y[idx.to(self.y.device)]


DEFENSES: Dict[str, Defense] = {d.name: d for d in (
    Defense("medic", medic_clone, data="clean", uses_labels=True, trains=True, returns="model"),
    Defense("bcu", bcu_cleanse, data="clean", uses_labels=False, trains=True, returns="model"),
    Defense("dde", dde_prune, data="training", uses_labels=False, trains=False,
            returns="prune"),
    Defense("mbns", mbns_prune, data="clean", uses_labels=True, trains=False,
            returns="prune"),
    Defense("none", _no_defense, data="none", uses_labels=False, trains=False,
            returns="model", baseline=True),
    Defense("finetune", _finetune, data="clean", uses_labels=True, trains=True,
            returns="model", baseline=True, takes_tensors=True),
)}


def names(baselines: bool = False) -> Tuple[str, ...]:
    """The defenses' names, in the registry's order; with ``baselines``, the baselines last."""
    return tuple(name for name, d in DEFENSES.items() if baselines or not d.baseline)


def get(name: str) -> Defense:
    """The defense called ``name``; a ValueError lists the known ones."""
    try:
        return DEFENSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown defense {name!r}; choose from {list(DEFENSES)}") from None


def data_help() -> str:
    """One sentence per defense on the data it wants, for the CLI's help."""
    parts = []
    for d in DEFENSES.values():
        if d.baseline:
            continue
        what = "clean images" if d.data == "clean" else "the model's (possibly poisoned) " \
            "training images"
        parts.append(f"{d.name} wants {what}" + (" and uses y when present" if d.uses_labels
                                                  else ""))
    return "; ".join(parts) + "."


def cleaned_model(defense: Defense, result: Any) -> nn.Module:
    """The defended model out of what :attr:`Defense.run` returned."""
    if defense.returns == "prune":
        assert isinstance(result, PruneResult)
        return result.model
    return result


@dataclass
class Outcome:
    """What :func:`run` returns.

    Attributes:
        model: the defended model (a new model unless the defense ran with ``inplace=True``).
        report: the pruning report of DDE and MBNS (:class:`~bdfast.PruneResult`), else None.
        options: the options the defense was called with, the ones :func:`run` added included.
        seconds: wall time of the defense, the loaders' construction excluded.
    """

    model: nn.Module
    report: Optional[dict]
    options: Dict[str, Any]
    seconds: float


def _split(data: DataSpec) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
    """``(x, y)`` of tensor data, or None for a loader."""
    if isinstance(data, Tensor):
        return data, None
    if isinstance(data, tuple) and data and isinstance(data[0], Tensor):
        if len(data) != 2:
            raise ValueError(f"tensor data must be x or (x, y), got a tuple of {len(data)}")
        return data[0], data[1]
    return None


def _loader(data: DataSpec, *, labels: bool, batch_size: int, shuffle: bool,
            seed: Optional[int]) -> Iterable:
    tensors = _split(data)
    if tensors is None:
        return data
    x, y = tensors
    return tensor_loader(x, y if labels else None, batch_size=batch_size, shuffle=shuffle,
                         seed=seed)


def defense_loader(name: str, data: DataSpec, *, batch_size: Optional[int] = None,
                   seed: Optional[int] = None) -> Iterable:
    """The loader :func:`run` hands defense ``name`` for ``data`` (a loader is used as given):
    labels only where the defense reads them, batches of ``batch_size`` (default 64, shuffled
    with ``seed``, for a training defense; 256, in order, for a statistics pass)."""
    defense = get(name)
    size = batch_size or (TRAIN_BATCH if defense.trains else STATISTICS_BATCH)
    return _loader(data, labels=defense.uses_labels, batch_size=size, shuffle=defense.trains,
                   seed=seed)


def run(name: str, model: nn.Module, *, clean: DataSpec = None, train: DataSpec = None,
        batch_size: Optional[int] = None, seed: Optional[int] = None,
        **options: Any) -> Outcome:
    """Run defense ``name`` on ``model`` with the data that defense wants.

    Args:
        name: a defense of :func:`names` (or a baseline, ``"none"`` or ``"finetune"``).
        model: the suspect classifier; not modified unless ``inplace=True`` is an option.
        clean: the defender's small clean set, for MEDIC, BCU, MBNS and fine-tuning; for DDE,
            clean images held out for ``u="auto"`` (its ``val_loader``).
        train: the model's own, possibly poisoned, training images, for DDE.
        batch_size: of the loaders built from tensors (default 64 for the training defenses,
            shuffled; 256 for the statistics passes, in order).
        seed: seeds a training defense and its shuffling; ignored by the pruning defenses.
        **options: the defense's own keyword options.

    ``clean`` and ``train`` are a loader (used as given), images ``x [N, C, H, W]`` in [0, 1],
    or ``(x, y)``; labels are kept only for a defense that reads them. Raises ValueError when the
    data the defense wants is missing.
    """
    defense = get(name)
    wanted = clean if defense.data == "clean" else train
    if wanted is None and defense.data != "none":
        flag, what = (("clean", "a small clean set") if defense.data == "clean" else
                      ("train", "the model's (possibly poisoned) training images"))
        raise ValueError(f"{name} needs {flag}=..., {what}")
    if defense.trains:
        options["seed"] = seed
    if defense.data == "none":
        arguments: Tuple[Any, ...] = ()
    elif defense.takes_tensors:
        tensors = _split(wanted)
        if tensors is None or tensors[1] is None:
            raise ValueError(f"{name} needs clean=(x, y) as tensors")
        arguments = tensors
        if batch_size is not None:
            options["batch_size"] = batch_size
    else:
        arguments = (defense_loader(name, wanted, batch_size=batch_size, seed=seed),)
        if defense.data == "training" and clean is not None and "val_loader" in defense.options():
            options.setdefault("val_loader", _loader(clean, labels=True,
                                                     batch_size=STATISTICS_BATCH, shuffle=False,
                                                     seed=None))
    start = time.perf_counter()
    result = defense.run(model, *arguments, **options)
    seconds = time.perf_counter() - start
    report = result.report if isinstance(result, PruneResult) else None
    return Outcome(model=cleaned_model(defense, result), report=report, options=options,
                   seconds=seconds)
