"""The whole story on real data: backdoor a digits classifier with each attack, run every
defense on it, and report ACC / ASR / RA / DER and time per (attack, defense).

Everything runs on scikit-learn's embedded handwritten digits, so nothing is downloaded.
"""
from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from bdfast import defenses as defense_table
from bdfast import ops
from bdfast._utils import progress, resolve_device, write
from bdfast._version import __version__
from bdfast.lab import LabModel, backdoored
from bdfast.lab.metrics import der, evaluate

ATTACKS = ("badnets", "blended", "sig", "wanet")
# The two baselines, then every library defense.
DEMO_DEFENSES = ("none", "finetune") + defense_table.names()

# Wall times, in seconds, that `bdfast demo` and `bdfast demo --quick` (all attacks and defenses,
# seed 0) reported on the 2-core AVX2 CPU machine of the README's table, otherwise idle, at
# commit c23fb91. The command's help and the README quote these numbers.
FULL_RUN_SECONDS = 185
QUICK_RUN_SECONDS = 23


@dataclass
class DemoConfig:
    """Budgets of one demo run. ``quick()`` is a smoke-test version of the same run."""

    attacks: Sequence[str] = ATTACKS
    defenses: Sequence[str] = DEMO_DEFENSES
    seed: int = 0
    poison_rate: float = 0.1
    attack_epochs: int = 30
    finetune_epochs: int = 20
    # Epochs of the training defenses (MEDIC, BCU); None keeps each one's library default.
    defense_epochs: Optional[int] = None
    batch_size: int = 64
    device: Optional[str] = None
    # Per-defense keyword overrides, empty by default: the demo shows what a user who calls
    # each defense with the library's defaults gets.
    options: Dict[str, dict] = field(default_factory=dict)

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        budget = dict(attack_epochs=4, finetune_epochs=2, defense_epochs=2)
        budget.update(overrides)
        return cls(**budget)


# An attack whose ASR stays below this before any defense did not implant a backdoor, so no
# defense can be said to remove it.
IMPLANTED_ASR = 0.5


@dataclass
class DemoRow:
    """One (attack, defense) result: metrics after the defense, and of the backdoored model
    before it (``acc_before``, ``asr_before``), as fractions; ``seconds`` the defense took."""

    attack: str
    defense: str
    acc: float
    asr: float
    ra: float
    der: float
    seconds: float
    acc_before: float = float("nan")
    asr_before: float = float("nan")
    note: str = ""


def _run_defense(name: str, lab_model: LabModel, cfg: DemoConfig, show: bool) -> nn.Module:
    """Defense (or baseline) ``name`` with the library's defaults and the data it wants: the
    clean split, or the poisoned training images the model was trained on."""
    trains = defense_table.get(name).trains
    options: Dict[str, object] = dict(cfg.options.get(name, {}))
    if name == "finetune":
        options.setdefault("epochs", cfg.finetune_epochs)
    elif cfg.defense_epochs is not None and trains:
        options.setdefault("epochs", cfg.defense_epochs)
    if trains:
        options.setdefault("device", cfg.device)
    # The statistics passes keep run()'s batches of 256; the batch size is a training budget.
    return defense_table.run(name, lab_model.model, clean=lab_model.data.clean,
                             train=lab_model.poisoned[0],
                             batch_size=cfg.batch_size if trains else None, seed=cfg.seed,
                             progress=show, **options).model


# The architecture of the demo's models: bdfast.lab.models.digits_cnn() with its defaults (10
# classes, one channel) loads a state_dict that `bdfast demo --save-model` wrote.
DEMO_ARCH = "digits_cnn"


def backdoored_teacher(attack_name: str, cfg: DemoConfig, *,
                       show_progress: bool = True) -> LabModel:
    """The demo's backdoored model for ``attack_name``: :func:`bdfast.lab.models.digits_cnn`
    trained on the lab's digits poisoned by that attack at ``cfg.poison_rate``, for
    ``cfg.attack_epochs`` epochs, seeded by ``cfg.seed``; the model every defense then cleans."""
    _check_names([attack_name], ATTACKS, "attacks")
    return backdoored("digits", DEMO_ARCH, attack_name, cfg.seed, rate=cfg.poison_rate,
                      epochs=cfg.attack_epochs, device=resolve_device(cfg.device),
                      progress=show_progress)


def _check_names(names: Sequence[str], known: Sequence[str], what: str) -> List[str]:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; choose from {list(known)}")
    if not names:
        raise ValueError(f"at least one {what[:-1]} is needed")
    return list(names)


def run_demo(cfg: DemoConfig, *, show_progress: bool = True,
             log: Callable[[str], None] = write,
             on_row: Optional[Callable[[List[DemoRow]], None]] = None) -> List[DemoRow]:
    """Train one backdoored digits CNN per attack and run every defense on it.

    Returns one :class:`DemoRow` per (attack, defense); metrics are fractions in [0, 1]
    measured on the held-out digits test split (see :mod:`bdfast.lab.metrics`). ``log`` gets one
    line per model and defense (by default printed above the progress bars); ``on_row`` gets
    the rows so far after each defense, so that an interrupted run keeps what it measured.
    """
    attack_names = _check_names(cfg.attacks, ATTACKS, "attacks")
    defense_names = _check_names(cfg.defenses, DEMO_DEFENSES, "defenses")
    rows: List[DemoRow] = []
    for attack_name in attack_names:
        start = time.perf_counter()
        lab_model = backdoored_teacher(attack_name, cfg, show_progress=show_progress)
        data, attack = lab_model.data, lab_model.attack
        before = evaluate(lab_model.model, *data.test, attack=attack)
        log(f"[{attack_name}] backdoored model: acc {before['acc']:.3f}, asr {before['asr']:.3f} "
            f"({time.perf_counter() - start:.1f}s to train)")
        for defense in progress(defense_names, enabled=show_progress, desc=f"{attack_name}",
                                unit="defense"):
            start = time.perf_counter()
            defended = _run_defense(defense, lab_model, cfg, show_progress)
            seconds = time.perf_counter() - start
            after = evaluate(defended, *data.test, attack=attack)
            rows.append(DemoRow(attack_name, defense, after["acc"], after["asr"], after["ra"],
                                der(before, after), seconds, acc_before=before["acc"],
                                asr_before=before["asr"]))
            if on_row is not None:
                on_row(list(rows))
            log(f"[{attack_name}] {defense:>8}: acc {after['acc']:.3f}  asr {after['asr']:.3f}  "
                f"ra {after['ra']:.3f}  ({seconds:.1f}s)")
    return rows


def best_per_attack(rows: Sequence[DemoRow]) -> Dict[str, DemoRow]:
    """The defense with the highest DER for each attack (ties: the faster one).

    Attacks that did not implant (ASR before the defense below :data:`IMPLANTED_ASR`) get no
    entry: with no backdoor to remove, DER only ranks accuracy noise.
    """
    best: Dict[str, DemoRow] = {}
    for row in rows:
        if row.defense == "none" or not row.asr_before >= IMPLANTED_ASR:
            continue
        current = best.get(row.attack)
        if current is None or (row.der, -row.seconds) > (current.der, -current.seconds):
            best[row.attack] = row
    return best


def environment() -> dict:
    """Where the numbers were measured."""
    info = ops.backend_info()
    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return {"bdfast": __version__, "torch": torch.__version__, "python":
            platform.python_version(), "machine": platform.machine(), "cpu_threads":
            torch.get_num_threads(), "device": device, "native_cpu": info["native_cpu"],
            "native_cuda": info["native_cuda"]}


def rows_as_dicts(rows: Sequence[DemoRow]) -> List[dict]:
    return [asdict(row) for row in rows]
