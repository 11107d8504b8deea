"""bdfast: fast backdoor removal for PyTorch image classifiers.

Defenses: :func:`medic_clone`, :func:`bcu_cleanse`, :func:`dde_prune`, :func:`mbns_prune`;
any of them by name, with the data it wants: :func:`bdfast.defenses.run`.
Fused ops: :mod:`bdfast.ops`; their readable ground truth: :mod:`bdfast.reference`.
The lab, which makes backdoored models to try the defenses on: :mod:`bdfast.lab`
(:mod:`bdfast.lab.data`, :mod:`bdfast.lab.models`, :mod:`bdfast.lab.attacks`, :func:`train`,
:func:`evaluate`, :func:`bdfast.lab.backdoored`). docs/architecture.md maps the packages.
"""
from bdfast._version import __version__
from bdfast import defenses, lab, ops, reference
from bdfast.defenses import (Medic, PruneResult, bcu_cleanse, dde_prune, mbns_prune,
                             medic_clone)
from bdfast.lab.metrics import evaluate
from bdfast.lab.trainer import train
from bdfast.loaders import tensor_loader
from bdfast.ops import backend_info

__all__ = ["medic_clone", "Medic", "bcu_cleanse", "dde_prune", "mbns_prune", "PruneResult",
           "tensor_loader", "backend_info", "ops", "reference", "defenses", "lab", "train",
           "evaluate", "__version__"]
