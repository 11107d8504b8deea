"""The defenses, each described once: what it is called, what data it wants, what it returns.

The CLI (``bdfast clean --method``), the demo and the option parsing read this table; adding a
defense means writing its module and one line here.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

from torch import nn

from bdfast.bcu import bcu_cleanse
from bdfast.dde import dde_prune
from bdfast.mbns import mbns_prune
from bdfast.medic import medic_clone
from bdfast.pruning import PruneResult

__all__ = ["Defense", "DEFENSES", "names", "get", "cleaned_model", "data_help"]


@dataclass(frozen=True)
class Defense:
    """One defense.

    Attributes:
        name: its name in the CLI, the demo and reports.
        run: ``run(model, loader, **options)``, the public function.
        data: "clean" (a small clean set) or "training" (the model's own, possibly poisoned,
            training images).
        uses_labels: whether it reads labels from ``(x, y)`` batches (MEDIC; the others
            ignore them or need none).
        trains: whether it trains a model (then its loader is shuffled and seeded, and it
            takes ``seed`` and ``epochs``), or only computes statistics and prunes.
        returns: "model" (an ``nn.Module``) or "prune" (a :class:`~bdfast.PruneResult` with
            ``.model`` and ``.report``).
    """

    name: str
    run: Callable[..., Any]
    data: str
    uses_labels: bool
    trains: bool
    returns: str

    def options(self) -> Dict[str, inspect.Parameter]:
        """The keyword options of :attr:`run`, with their defaults and annotations."""
        return {name: p for name, p in inspect.signature(self.run).parameters.items()
                if p.kind is p.KEYWORD_ONLY}


DEFENSES: Dict[str, Defense] = {d.name: d for d in (
    Defense("medic", medic_clone, data="clean", uses_labels=True, trains=True, returns="model"),
    Defense("bcu", bcu_cleanse, data="clean", uses_labels=False, trains=True, returns="model"),
    Defense("dde", dde_prune, data="training", uses_labels=False, trains=False,
            returns="prune"),
    Defense("mbns", mbns_prune, data="clean", uses_labels=False, trains=False,
            returns="prune"),
)}


def names() -> Tuple[str, ...]:
    return tuple(DEFENSES)


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
