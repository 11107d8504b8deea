"""bdfast: fast backdoor removal for PyTorch image classifiers.

Defenses: :func:`medic_clone`, :func:`bcu_cleanse`, :func:`dde_prune`, :func:`mbns_prune`;
any of them by name, with the data it wants: :func:`bdfast.defenses.run`.
Fused ops: :mod:`bdfast.ops`; their readable ground truth: :mod:`bdfast.reference`.
The lab: :mod:`bdfast.data`, :mod:`bdfast.models`, :mod:`bdfast.attacks`, :func:`train`,
:func:`evaluate`, and backdoored lab models from :func:`bdfast.lab.backdoored`.
"""
__version__ = "0.1.0"

from bdfast._extension import backend_info
from bdfast import attacks, data, metrics, models, ops, reference
from bdfast import defenses, lab
from bdfast.bcu import bcu_cleanse
from bdfast.dde import dde_prune
from bdfast.mbns import mbns_prune
from bdfast.medic import Medic, medic_clone
from bdfast.metrics import evaluate
from bdfast.pruning import PruneResult
from bdfast.trainer import train

__all__ = ["medic_clone", "Medic", "bcu_cleanse", "dde_prune", "mbns_prune", "PruneResult",
           "backend_info", "ops", "reference", "attacks", "data", "metrics", "models", "train",
           "defenses", "lab",
           "evaluate", "__version__"]
