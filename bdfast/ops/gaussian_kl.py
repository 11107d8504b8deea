"""``gaussian_kl``: MBNS's closed-form Gaussian KL divergence over packed BN channels."""
from __future__ import annotations

import torch
from torch import Tensor

from bdfast import reference
from bdfast.ops import _extension
from bdfast.ops._dispatch import (FLOAT_DTYPES, check_same_device, check_scalar, check_tensor,
                                  fake_check, use_native)

_NAMES = ("mu_p", "var_p", "mu_q", "var_q")


def gaussian_kl(mu_p: Tensor, var_p: Tensor, mu_q: Tensor, var_q: Tensor, *, eps: float = 1e-5,
                backend: str = "auto") -> Tensor:
    """KL(N(mu_p, var_p) || N(mu_q, var_q)) elementwise over packed [K] vectors (MBNS, Sec. 4.2).

    ``log(sqrt(var_q) / sqrt(var_p)) + (var_p + (mu_p - mu_q)^2) / (2 var_q) - 1/2`` with both
    variances floored at ``eps``. Inputs: four [K] tensors (float32, float16, bfloat16 or
    float64) on one device. Returns [K] float32.
    """
    inputs = [check_tensor(v, n, dims=(1,), dtypes=FLOAT_DTYPES + (torch.float64,))
              for n, v in zip(_NAMES, (mu_p, var_p, mu_q, var_q))]
    device = check_same_device(zip(_NAMES, inputs))
    for name, v in zip(_NAMES[1:], inputs[1:]):
        if v.shape != inputs[0].shape:
            raise ValueError(f"{name} has shape {list(v.shape)} but mu_p has shape "
                             f"{list(inputs[0].shape)}; all four vectors must match")
    eps = check_scalar(eps, "eps", positive=True)
    if use_native("gaussian_kl", backend, device):
        return torch.ops.bdfast.gaussian_kl(*(v.contiguous() for v in inputs), float(eps))
    return reference.gaussian_kl(*inputs, eps=eps).float()


if _extension.loaded():
    @torch.library.register_fake("bdfast::gaussian_kl")
    def _(mu_p, var_p, mu_q, var_q, eps):
        fake_check(mu_p.dim() == 1 and var_p.shape == mu_p.shape and mu_q.shape == mu_p.shape
                   and var_q.shape == mu_p.shape,
                   "gaussian_kl: mu_p, var_p, mu_q and var_q must be 1-D tensors of the same "
                   f"length, got shapes {[list(v.shape) for v in (mu_p, var_p, mu_q, var_q)]}")
        return mu_p.new_empty(mu_p.shape, dtype=torch.float32)
