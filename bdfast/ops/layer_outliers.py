"""``layer_outliers``: the per-layer mean +/- u*std pruning rule of DDE and MBNS."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from bdfast import reference
from bdfast.ops import _extension
from bdfast.ops._dispatch import (FLOAT_DTYPES, check_offsets, check_tensor, fake_check,
                                  fake_check_offsets, use_native)

DIRECTIONS = ("low", "high")


def layer_outliers(scores: Tensor, offsets: Optional[Tensor] = None, *, u: float = 3.0,
                   direction: str = "low", return_thresholds: bool = False,
                   backend: str = "auto") -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Flag the scores that lie more than u standard deviations below/above their layer's mean.

    Args:
        scores: packed per-channel scores [K] of all layers.
        offsets: [L+1] int64 layer boundaries (``None``: one layer).
        u: threshold factor; direction: "low" (DDE) or "high" (MBNS).
        return_thresholds: also return each layer's threshold.

    Returns:
        bool [K]. Mean and unbiased std are taken per layer over its finite scores; NaN scores
        are never flagged, and a layer with fewer than 2 finite scores flags nothing. With
        ``return_thresholds`` the tuple ``(mask, thresholds)``: thresholds [L] float64 on the
        scores' device, ``m - u*sd`` ("low") or ``m + u*sd`` ("high"), NaN for a layer with
        fewer than 2 finite scores.
    """
    check_tensor(scores, "scores", dims=(1,), dtypes=FLOAT_DTYPES + (torch.float64,))
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'low' or 'high', got {direction!r}")
    offsets = check_offsets(offsets, scores.shape[0], scores.device)
    if use_native("layer_outliers", backend, scores.device):
        mask, thresholds = torch.ops.bdfast.layer_outliers(scores.contiguous(), offsets,
                                                           float(u), direction == "high")
    else:
        mask, thresholds = reference.layer_outliers(scores, offsets, u=u, direction=direction,
                                                    return_thresholds=True)
    return (mask, thresholds) if return_thresholds else mask


if _extension.loaded():
    @torch.library.register_fake("bdfast::layer_outliers")
    def _(scores, offsets, u, high):
        fake_check(scores.dim() == 1, "layer_outliers: scores must be a 1-D tensor [K], got "
                                      f"shape {list(scores.shape)}")
        fake_check(scores.dtype in FLOAT_DTYPES + (torch.float64,),
                   "layer_outliers: scores must be float32, float64, float16 or bfloat16, got "
                   f"{scores.dtype}")
        fake_check_offsets(offsets, "layer_outliers")
        return (scores.new_empty(scores.shape, dtype=torch.bool),
                scores.new_empty((offsets.shape[0] - 1,), dtype=torch.float64))
