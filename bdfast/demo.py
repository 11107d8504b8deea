"""The whole story on real data: backdoor a digits classifier with each attack, run every
defense on it, and report ACC / ASR / RA / DER and time per (attack, defense).

Everything runs on scikit-learn's embedded handwritten digits, so nothing is downloaded.
"""
from __future__ import annotations

import copy
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

import bdfast
from bdfast import attacks as attack_lib
from bdfast import defenses as defense_table
from bdfast._utils import progress, resolve_device, write
from bdfast.data import Digits, load_digits, tensor_loader
from bdfast.metrics import der, evaluate
from bdfast.models import digits_cnn
from bdfast.trainer import train

ATTACKS = ("badnets", "blended", "sig", "wanet")
# The two baselines, then every library defense.
DEMO_DEFENSES = ("none", "finetune") + defense_table.names()

# Measured wall times, in seconds, of `bdfast demo` and `bdfast demo --quick` (all attacks and
# defenses, seed 0, start to finish) on the 2-core CPU machine of the README's table; the quick
# run was timed while another job shared the machine, so it is an upper bound. The command's
# help and the README quote these numbers.
FULL_RUN_SECONDS = 156
QUICK_RUN_SECONDS = 62


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


def _finetune(model: nn.Module, data: Digits, poisoned, cfg: DemoConfig, show: bool):
    """The baseline: plain fine-tuning of a copy on the defender's clean set."""
    student = copy.deepcopy(model)
    x, y = data.clean
    return train(student, x, y, epochs=cfg.finetune_epochs, lr=0.01, batch_size=cfg.batch_size,
                 device=cfg.device, seed=cfg.seed, progress=show, **cfg.options.get("finetune", {}))


def _library_runner(name: str) -> Callable:
    """Runs library defense ``name`` with the data it wants (:mod:`bdfast.defenses`): the clean
    split, or the poisoned training images the model was trained on."""
    defense = defense_table.get(name)

    def run(model: nn.Module, data: Digits, poisoned, cfg: DemoConfig, show: bool) -> nn.Module:
        x, y = poisoned if defense.data == "training" else data.clean
        labels = y if defense.uses_labels else None
        options: Dict[str, object] = {"progress": show}
        if defense.trains:
            loader = tensor_loader(x, labels, batch_size=cfg.batch_size, shuffle=True,
                                   seed=cfg.seed)
            options.update(seed=cfg.seed, device=cfg.device)
            if cfg.defense_epochs is not None:
                options["epochs"] = cfg.defense_epochs
        else:
            loader = tensor_loader(x, labels, batch_size=256)
        options.update(cfg.options.get(name, {}))
        return defense_table.cleaned_model(defense, defense.run(model, loader, **options))

    return run


DEFENSE_RUNNERS: Dict[str, Callable] = {
    "none": lambda model, data, poisoned, cfg, show: model,
    "finetune": _finetune,
    **{name: _library_runner(name) for name in defense_table.names()},
}


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
    measured on the held-out digits test split (see :mod:`bdfast.metrics`). ``log`` gets one
    line per model and defense (by default printed above the progress bars); ``on_row`` gets
    the rows so far after each defense, so that an interrupted run keeps what it measured.
    """
    attack_names = _check_names(cfg.attacks, ATTACKS, "attacks")
    defense_names = _check_names(cfg.defenses, DEMO_DEFENSES, "defenses")
    device = resolve_device(cfg.device)
    data = load_digits(seed=cfg.seed)
    rows: List[DemoRow] = []
    for attack_name in attack_names:
        attack = attack_lib.get(attack_name)
        x_train, y_train, _ = attack.poison(*data.train, rate=cfg.poison_rate, seed=cfg.seed)
        start = time.perf_counter()
        torch.manual_seed(cfg.seed)
        backdoored = train(digits_cnn().to(device), x_train, y_train, epochs=cfg.attack_epochs,
                           batch_size=cfg.batch_size, device=device, seed=cfg.seed,
                           progress=show_progress)
        before = evaluate(backdoored, *data.test, attack=attack)
        log(f"[{attack_name}] backdoored model: acc {before['acc']:.3f}, asr {before['asr']:.3f} "
            f"({time.perf_counter() - start:.1f}s to train)")
        for defense in progress(defense_names, enabled=show_progress, desc=f"{attack_name}"):
            start = time.perf_counter()
            defended = DEFENSE_RUNNERS[defense](backdoored, data, (x_train, y_train), cfg,
                                                show_progress)
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
    info = bdfast.backend_info()
    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return {"bdfast": bdfast.__version__, "torch": torch.__version__, "python":
            platform.python_version(), "machine": platform.machine(), "cpu_threads":
            torch.get_num_threads(), "device": device, "native_cpu": info["native_cpu"],
            "native_cuda": info["native_cuda"]}


def rows_as_dicts(rows: Sequence[DemoRow]) -> List[dict]:
    return [asdict(row) for row in rows]
