"""MBNS: prune the BN channels whose running statistics Mismatch the statistics of clean data
(DDE/MBNS paper, Sec. 4.3 and 4.4; docs/pruning.md).

A model trained on poisoned data records, in each BN layer, the mean and variance of the
clean+poisoned mixture. On a backdoor neuron the poisoned samples pull these far from what
clean data produces; on a benign neuron they agree. So: measure each BN input channel's mean
and variance on a few clean images, compute KL(N(clean) || N(running stats)), and prune the
channels more than u standard deviations above their layer's mean KL.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bdfast import ops
from bdfast._utils import distributed
from bdfast.defenses.pruning import (DEFAULT_ACC_BUDGET, ChannelStatistic, HeldOutHalves,
                                     PruneResult, apply_preset, check_options, prune_outliers)
from bdfast.defenses.stats import ChannelMoments

__all__ = ["mbns_prune", "BACKDOORBENCH_SETTINGS"]

# What preset="backdoorbench" sets besides its divergence (BackdoorBenchKL), and why: how
# BackdoorBench's defense/bnp.py runs MBNS (docs/pruning.md, "BackdoorBench preset").
BACKDOORBENCH_SETTINGS = {
    "zero_bias": (True, "the bnp_defense of BackdoorBench's defense/bnp.py zeroes beta with "
                        "gamma"),
}


def mbns_prune(model: nn.Module, loader: Iterable, *, u: Union[float, str] = 3.0,
               val_loader: Optional[Iterable] = None,
               acc_budget: float = DEFAULT_ACC_BUDGET, zero_bias: bool = False,
               preset: Optional[str] = None, inplace: bool = False, device: Any = None,
               progress: bool = True) -> PruneResult:
    """Prune backdoor neurons whose BN running statistics do not match clean data.

    Args:
        model: the suspect model; it must contain affine BatchNorm layers with running
            statistics (every one is scored, shortcut BNs included). A model without BatchNorm
            is refused before any data is read, with a ValueError that points to MEDIC and BCU.
        loader: clean images: an iterable of batches ``x [B, C, H, W]`` or ``(x, y)`` (labels
            ignored). The paper finds 10 to 500 images enough.
        u: a channel is pruned when its KL is above ``mean + u * std`` of its layer's KLs.
            (The paper's text writes ``K < mean - u std``, but backdoor neurons have *large* KL
            and the released code prunes the upper tail.) ``"auto"`` tries u from 5 down to 1
            (:data:`~bdfast.defenses.pruning.AUTO_U_GRID`) and keeps the smallest whose pruning
            costs at most ``acc_budget`` of clean accuracy on held-out clean images; the report's
            ``sweep`` records every u tried.
        val_loader: the held-out clean images for ``u="auto"`` (``x`` or ``(x, y)``). If not
            given, every batch of ``loader`` is cut in two: the first half gives the
            statistics, the second half is held out. Without labels, accuracy is agreement
            with the unpruned model's predictions.
        acc_budget: the clean accuracy (a fraction) ``u="auto"`` may give up.
        zero_bias: also zero the pruned channels' BN bias (beta).
        preset: ``"backdoorbench"`` runs MBNS as BackdoorBench's ``defense/bnp.py`` does
            (docs/pruning.md, "BackdoorBench preset"): the statistics of the loader's first
            batch only, the BatchNorm2d layers only, BackdoorBench's divergence
            (:class:`BackdoorBenchKL`) and beta zeroed with gamma. ``zero_bias`` left at its
            default takes the preset's True; ``u="auto"`` is a ValueError. None: bdfast's own
            defaults.
        inplace: prune ``model`` itself instead of a deep copy.
        device: where to run (default: the model's device); with ``inplace`` the model moves.
        progress: show a progress bar over the statistics pass.

    Returns:
        :class:`~bdfast.defenses.pruning.PruneResult` with the pruned model and a report whose
        scores are the per-channel KL divergences (paper eq. 5)::

            KL_k = log(sd_run / sd_clean) + (var_clean + (mu_clean - mu_run)^2) / (2 var_run) - 1/2

        with mu_clean, var_clean the mean and unbiased variance of the BN input over all clean
        images and spatial positions (merged exactly in float64), mu_run, var_run the BN's
        running statistics, and both variances floored at 1e-5, so a channel that is constant
        on clean data gets a large KL instead of NaN.

    Under ``torch.distributed`` every rank passes its shard of the data and the moments are
    merged exactly, so all ranks prune the same channels.
    """
    check_options(u, zero_bias, inplace, acc_budget)
    options = apply_preset(preset, mbns_prune,
                           {"u": u, "acc_budget": acc_budget, "zero_bias": zero_bias},
                           BACKDOORBENCH_SETTINGS)
    if u == "auto" and val_loader is None:
        loader = HeldOutHalves(loader)
    statistic = BatchNormKL() if options["preset"] is None else BackdoorBenchKL()
    return prune_outliers(model, loader, statistic, u=u, val_loader=val_loader,
                          acc_budget=acc_budget, zero_bias=options["zero_bias"], inplace=inplace,
                          device=device, progress=progress, options=options)


class BatchNormKL(ChannelStatistic):
    """MBNS's statistic: each BN input channel's mean and unbiased variance over all clean
    images and positions (float64 moments, merged exactly); its score is KL(N(clean) || N(BN
    running statistics)) (``ops.gaussian_kl``, paper eq. 5), suspicious when high."""

    method, score_name, direction, running_stats = "mbns", "kl", "high", True

    def start(self, model: nn.Module, names: Sequence[str]) -> None:
        bns = dict(model.named_modules())
        self.running = [bns[n] for n in names]
        self.moments = [ChannelMoments() for _ in names]

    def update(self, layer: int, x: Tensor) -> None:
        self.moments[layer].update(x)

    def finish(self, seen: int, device: torch.device) -> Tuple[Tensor, int]:
        samples = seen
        if distributed():
            for m in self.moments:
                m.all_reduce()
            total = torch.tensor([seen], dtype=torch.int64, device=device)
            dist.all_reduce(total)
            samples = int(total)
        if samples < 2:
            raise ValueError(f"loader must yield at least 2 clean images to estimate "
                             f"statistics, got {samples}")
        self.mu = torch.cat([m.mean for m in self.moments])
        self.var = torch.cat([m.variance(unbiased=True) for m in self.moments])
        return torch.isfinite(self.mu) & torch.isfinite(self.var), samples

    def running_statistics(self) -> Tuple[Tensor, Tensor]:
        """The BN layers' running mean and variance, packed [K] like the scores."""
        return (torch.cat([bn.running_mean for bn in self.running]),
                torch.cat([bn.running_var for bn in self.running]))

    def score(self, offsets: Tensor) -> Tensor:
        mu_run, var_run = self.running_statistics()
        # Benign (clean sample) distribution first: KL(N_sample || N_BN), as in the released code.
        return ops.gaussian_kl(self.mu, self.var, mu_run, var_run)


class BackdoorBenchKL(BatchNormKL):
    """MBNS's statistic under ``preset="backdoorbench"``: the divergence of the ``bnp_defense``
    of BackdoorBench's ``defense/bnp.py``, float64 [K]::

        KL_k = log(var_run / var_batch) + (var_batch + (mu_batch - mu_run)^2) / (2 var_run) - 1/2

    Paper eq. 5 has log(sd_run / sd_batch), half this first term; neither variance is floored.
    Every channel of a layer where some KL_k is not finite (a variance of 0) scores NaN, so the
    layer prunes nothing: BackdoorBench's mean and std of that layer are not finite, and no
    comparison with its threshold holds.
    """

    def score(self, offsets: Tensor) -> Tensor:
        mu_run, var_run = self.running_statistics()
        kl = (torch.log(var_run / self.var)
              + (self.var + (self.mu - mu_run).square()) / (2 * var_run) - 0.5)
        bounds = offsets.tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if not bool(torch.isfinite(kl[lo:hi]).all()):
                kl[lo:hi] = math.nan
        return kl
