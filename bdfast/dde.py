"""DDE: prune the BN channels whose activation distribution has a Discrepantly low Differential
Entropy on the (poisoned) training set (DDE/MBNS paper, Sec. 4.2 and 4.4; SPEC 5.2).

On a backdoor neuron the poisoned samples form a second mode, and a standardised two-mode
mixture has less entropy than the (entropy-maximising) Gaussian of a benign neuron. So:
per sample, take the spatial max of every BN input channel (the paper's "pre-activation",
Sec. 3.4), estimate each channel's entropy with a histogram, and prune the channels more than
u standard deviations below their layer's mean entropy.
"""
from __future__ import annotations

import time
from typing import Any, Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bdfast import ops
from bdfast._utils import check_number, distributed
from bdfast.pruning import (PruneResult, bn_input_pass, check_finite, check_options,
                            layer_offsets, prepare, prune, report)

__all__ = ["dde_prune"]


def dde_prune(model: nn.Module, loader: Iterable, *, u: float = 3.0, step: float = 0.01,
              reference_compat: bool = False, max_samples: Optional[int] = None,
              zero_bias: bool = False, inplace: bool = False, device: Any = None,
              progress: bool = True) -> PruneResult:
    """Prune backdoor neurons by their low differential entropy on the training set.

    Args:
        model: the suspect model; it must contain affine BatchNorm layers (every one is scored,
            shortcut BNs included).
        loader: the (poisoned) training images: an iterable of batches ``x [B, C, H, W]`` or
            ``(x, y)`` (labels ignored), without augmentation.
        u: a channel is pruned when its entropy is below ``mean - u * std`` of its layer's
            entropies (paper Sec. 4.4, ``tau_h = h_bar - u_h s_h``); 3 on CIFAR-10, 4 on
            Tiny-ImageNet.
        step: histogram bin width in standardised units.
        reference_compat: use the released code's histogram estimator (SPEC 5.3) instead of the
            paper's differential entropy ``-sum p ln(p / step)``.
        max_samples: use at most this many images (default: all the loader yields).
        zero_bias: also zero the pruned channels' BN bias (beta).
        inplace: prune ``model`` itself instead of a deep copy.
        device: where to run (default: the model's device); with ``inplace`` the model moves.
        progress: show a progress bar over the statistics pass.

    Returns:
        :class:`~bdfast.pruning.PruneResult` with the pruned model and a report whose scores
        are the entropies h (NaN for a constant neuron, which is never pruned).

    Under ``torch.distributed`` every rank passes its shard of the data and the [N_rank, K]
    samples are gathered, so all ranks prune the same channels.
    """
    check_options(u, zero_bias, inplace)
    check_number(step, "step", note=" (the histogram bin width)")
    if not isinstance(reference_compat, bool):
        raise TypeError(f"reference_compat must be True or False, got {reference_compat!r}")
    check_number(max_samples, "max_samples", integer=True, minimum=2, allow_none=True)
    start = time.perf_counter()
    work, names, device = prepare(model, method="dde_prune", inplace=inplace, device=device)

    # phi_k = max over spatial positions of the BN input (paper Sec. 3.4), one row per sample.
    blocks: List[List[Tensor]] = [[] for _ in names]

    def spatial_max(i: int, x: Tensor) -> None:
        blocks[i].append(x.flatten(2).amax(dim=2).float() if x.dim() > 2 else x.float())

    seen, convs = bn_input_pass(work, names, loader, spatial_max, device=device,
                                progress=progress, desc="dde statistics", max_samples=max_samples)
    phi = torch.cat([torch.cat(b) for b in blocks], dim=1)  # [N, K]: layers side by side
    del blocks
    if distributed():
        phi = _gather_rows(phi)[:max_samples]
    if phi.shape[0] < 2:
        raise ValueError(f"loader must yield at least 2 images to estimate entropies, got "
                         f"{phi.shape[0]}")
    offsets = layer_offsets(work, names, device)
    check_finite(torch.isfinite(phi).all(dim=0), offsets, names)

    h = ops.histogram_entropy(phi, offsets, step=step, reference_compat=reference_compat)
    mask = ops.layer_outliers(h, offsets, u=u, direction="low")
    layers = prune(work, names, convs, offsets, h, mask, u=u, direction="low",
                   zero_bias=zero_bias)
    options = {"u": u, "step": step, "reference_compat": reference_compat,
               "max_samples": max_samples, "zero_bias": zero_bias}
    return PruneResult(work, report("dde", "entropy", options, phi.shape[0], layers, start))


def _gather_rows(x: Tensor) -> Tensor:
    """All ranks' [N_rank, K] rows stacked in rank order (ranks may hold different N_rank)."""
    counts = [torch.zeros(1, dtype=torch.int64, device=x.device)
              for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    counts = [int(c) for c in counts]
    padded = x.new_zeros(max(counts), x.shape[1])  # all_gather needs equal shapes
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])
