"""bdfast's fused ops. Each dispatches to a compiled kernel or to :mod:`bdfast.reference`.

Every op takes ``backend=`` one of :data:`BACKENDS`: "auto", "reference" or "native"; see
:func:`bdfast.backend_info`.
"""
from bdfast.ops import _dispatch, selftest
from bdfast.ops._dispatch import BACKENDS
from bdfast.ops.gaussian_kl import gaussian_kl
from bdfast.ops.histogram_entropy import histogram_entropy
from bdfast.ops.layer_outliers import layer_outliers
from bdfast.ops.medic_clone_loss import medic_clone_loss
from bdfast.ops.selftest import backend_info

__all__ = ["medic_clone_loss", "histogram_entropy", "gaussian_kl", "layer_outliers", "BACKENDS",
           "backend_info"]

_dispatch.gpu_self_check = selftest.gpu_problem
