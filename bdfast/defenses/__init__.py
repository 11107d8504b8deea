"""The defenses, and everything a defense call runs besides the ops and the hooks.

One module per defense (:mod:`~bdfast.defenses.medic`, :mod:`~bdfast.defenses.bcu`,
:mod:`~bdfast.defenses.dde`, :mod:`~bdfast.defenses.mbns`), the machinery they share (the training
loop :mod:`~bdfast.defenses.distill`, :mod:`~bdfast.defenses.checkpoint`, the teacher cache,
statistics, re-initialisation, augmentation, channel pruning), and the registry
(:mod:`~bdfast.defenses.registry`: :func:`run` hands each defense its data by name).
"""
from bdfast.defenses.bcu import BcuResult, bcu_cleanse, bcu_fit
from bdfast.defenses.dde import dde_prune
from bdfast.defenses.mbns import mbns_prune
from bdfast.defenses.medic import Medic, MedicResult, medic_clone
from bdfast.defenses.pruning import PruneResult
from bdfast.defenses.registry import (DEFENSES, DataSpec, Defense, Outcome, cleaned_model,
                                      data_help, get, names, run)

__all__ = ["medic_clone", "Medic", "MedicResult", "bcu_cleanse", "bcu_fit", "BcuResult",
           "dde_prune", "mbns_prune", "PruneResult", "Defense", "DEFENSES", "Outcome", "run",
           "names", "get", "cleaned_model", "data_help", "DataSpec"]
