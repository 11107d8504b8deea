"""MBNS: prune the BN channels whose running statistics Mismatch the statistics of clean data
(DDE/MBNS paper, Sec. 4.3 and 4.4; SPEC 5.1).

A model trained on poisoned data records, in each BN layer, the mean and variance of the
clean+poisoned mixture. On a backdoor neuron the poisoned samples pull these far from what
clean data produces; on a benign neuron they agree. So: measure each BN input channel's mean
and variance on a few clean images, compute KL(N(clean) || N(running stats)), and prune the
channels more than u standard deviations above their layer's mean KL.
"""
from __future__ import annotations

import time
from typing import Any, Iterable, List, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bdfast import ops
from bdfast._utils import distributed
from bdfast.pruning import (DEFAULT_ACC_BUDGET, HeldOutHalves, PruneResult, bn_input_pass,
                            check_finite, check_options, layer_offsets, outlier_mask, prepare,
                            prune, report, validation_batches)
from bdfast.stats import ChannelMoments

__all__ = ["mbns_prune"]


def mbns_prune(model: nn.Module, loader: Iterable, *, u: Union[float, str] = 3.0,
               val_loader: Optional[Iterable] = None,
               acc_budget: float = DEFAULT_ACC_BUDGET, zero_bias: bool = False,
               inplace: bool = False, device: Any = None, progress: bool = True) -> PruneResult:
    """Prune backdoor neurons whose BN running statistics do not match clean data.

    Args:
        model: the suspect model; it must contain affine BatchNorm layers with running
            statistics (every one is scored, shortcut BNs included).
        loader: clean images: an iterable of batches ``x [B, C, H, W]`` or ``(x, y)`` (labels
            ignored). The paper finds 10 to 500 images enough.
        u: a channel is pruned when its KL is above ``mean + u * std`` of its layer's KLs.
            (The paper's text writes ``K < mean - u std``, but backdoor neurons have *large* KL
            and the released code prunes the upper tail.) ``"auto"`` tries u from 5 down to 1
            (:data:`~bdfast.pruning.AUTO_U_GRID`) and keeps the smallest whose pruning costs at
            most ``acc_budget`` of clean accuracy on held-out clean images; the report's
            ``sweep`` records every u tried.
        val_loader: the held-out clean images for ``u="auto"`` (``x`` or ``(x, y)``). If not
            given, every batch of ``loader`` is cut in two: the first half gives the
            statistics, the second half is held out. Without labels, accuracy is agreement
            with the unpruned model's predictions.
        acc_budget: the clean accuracy (a fraction) ``u="auto"`` may give up.
        zero_bias: also zero the pruned channels' BN bias (beta).
        inplace: prune ``model`` itself instead of a deep copy.
        device: where to run (default: the model's device); with ``inplace`` the model moves.
        progress: show a progress bar over the statistics pass.

    Returns:
        :class:`~bdfast.pruning.PruneResult` with the pruned model and a report whose scores are
        the per-channel KL divergences (paper eq. 5)::

            KL_k = log(sd_run / sd_clean) + (var_clean + (mu_clean - mu_run)^2) / (2 var_run) - 1/2

        with mu_clean, var_clean the mean and unbiased variance of the BN input over all clean
        images and spatial positions (merged exactly in float64), mu_run, var_run the BN's
        running statistics, and both variances floored at 1e-5, so a channel that is constant
        on clean data gets a large KL instead of NaN.

    Under ``torch.distributed`` every rank passes its shard of the data and the moments are
    merged exactly, so all ranks prune the same channels.
    """
    check_options(u, zero_bias, inplace, acc_budget)
    val_batches = None if val_loader is None else validation_batches(val_loader, "val_loader")
    if u == "auto" and val_batches is None:
        loader = HeldOutHalves(loader)
    start = time.perf_counter()
    work, names, device = prepare(model, method="mbns_prune", inplace=inplace, device=device,
                                  running_stats=True)

    moments: List[ChannelMoments] = [ChannelMoments() for _ in names]

    def accumulate(i: int, x: Tensor) -> None:
        moments[i].update(x)

    seen, convs = bn_input_pass(work, names, loader, accumulate, device=device,
                                progress=progress, desc="mbns statistics")
    samples = seen
    if distributed():
        for m in moments:
            m.all_reduce()
        total = torch.tensor([seen], dtype=torch.int64, device=device)
        dist.all_reduce(total)
        samples = int(total)
    if samples < 2:
        raise ValueError(f"loader must yield at least 2 clean images to estimate statistics, "
                         f"got {samples}")
    mu_clean = torch.cat([m.mean for m in moments])
    var_clean = torch.cat([m.variance(unbiased=True) for m in moments])
    bns = dict(work.named_modules())
    mu_run = torch.cat([bns[n].running_mean for n in names])
    var_run = torch.cat([bns[n].running_var for n in names])
    offsets = layer_offsets(work, names, device)
    check_finite(torch.isfinite(mu_clean) & torch.isfinite(var_clean), offsets, names)

    # Benign (clean sample) distribution first: KL(N_sample || N_BN), as in the released code.
    kl = ops.gaussian_kl(mu_clean, var_clean, mu_run, var_run)
    if isinstance(loader, HeldOutHalves):
        val_batches = loader.held
    chosen, sweep, mask = outlier_mask(work, names, offsets, kl, u=u, direction="high",
                                       zero_bias=zero_bias, val_batches=val_batches,
                                       acc_budget=acc_budget, device=device)
    layers = prune(work, names, convs, offsets, kl, mask, u=chosen, direction="high",
                   zero_bias=zero_bias)
    options = {"u": u, "acc_budget": acc_budget, "zero_bias": zero_bias}
    return PruneResult(work, report("mbns", "kl", options, samples, layers, start, chosen,
                                    sweep))
