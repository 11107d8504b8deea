"""bdfast: fast backdoor removal for PyTorch image classifiers.

Defenses: :func:`medic_clone`, :func:`bcu_cleanse`, :func:`dde_prune`, :func:`mbns_prune`.
Fused ops: :mod:`bdfast.ops`; their readable ground truth: :mod:`bdfast.reference`.
"""
from bdfast._extension import backend_info
from bdfast import ops, reference

__version__ = "0.1.0"

__all__ = ["backend_info", "ops", "reference", "__version__"]
