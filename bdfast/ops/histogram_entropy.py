"""``histogram_entropy``: DDE's histogram entropy of every packed neuron in one call."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bdfast import reference
from bdfast.ops import _extension
from bdfast.ops._dispatch import (FLOAT_DTYPES, check_offsets, check_scalar, check_tensor,
                                  fake_check, fake_check_offsets, use_native)


def histogram_entropy(x: Tensor, offsets: Optional[Tensor] = None, *, step: float = 0.01,
                      reference_compat: bool = False, backend: str = "auto") -> Tensor:
    """Histogram estimate of the differential entropy of each column of x (DDE, Sec. 4.1).

    Args:
        x: [N, K] samples (rows) of K neurons, the neurons of all layers packed side by side;
            float32, float16 or bfloat16.
        offsets: [L+1] int64 layer boundaries (``None``: all columns form one layer). Only the
            ``reference_compat`` estimator uses them (its grid is shared within a layer).
        step: bin width in standardised units: positive and finite in float32. The
            ``reference_compat`` grid holds at most
            :data:`bdfast.reference.MAX_COMPAT_BINS` bins per layer; a smaller step is an error.
        reference_compat: reproduce the released code's estimator exactly (see
            :func:`bdfast.reference.histogram_entropy`).
        backend: "auto", "native" or "reference".

    Returns:
        h [K] float32; NaN for constant or non-finite columns.
    """
    check_tensor(x, "x", dims=(2,))
    if x.shape[0] < 2:
        raise ValueError(f"x must hold at least 2 samples (rows) to standardise, got {x.shape[0]}")
    step = check_scalar(step, "step", positive=True)
    offsets = check_offsets(offsets, x.shape[1], x.device)
    if use_native("histogram_entropy", backend, x.device):
        return torch.ops.bdfast.histogram_entropy(x.contiguous(), offsets, float(step),
                                                  bool(reference_compat))
    return reference.histogram_entropy(x, offsets, step=step,
                                       reference_compat=reference_compat).float()


if _extension.loaded():
    @torch.library.register_fake("bdfast::histogram_entropy")
    def _(x, offsets, step, reference_compat):
        fake_check(x.dim() == 2, f"histogram_entropy: x must be a 2-D tensor [N, K], got shape "
                                 f"{list(x.shape)}")
        fake_check(x.dtype in FLOAT_DTYPES, "histogram_entropy: x must be float32, float16 or "
                                            f"bfloat16, got {x.dtype}")
        fake_check_offsets(offsets, "histogram_entropy")
        return x.new_empty((x.shape[1],), dtype=torch.float32)
