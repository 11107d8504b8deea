"""DDE: prune the BN channels whose activation distribution has a Discrepantly low Differential
Entropy on the (poisoned) training set (DDE/MBNS paper, Sec. 4.2 and 4.4; docs/pruning.md).

On a backdoor neuron the poisoned samples form a second mode, and a standardised two-mode
mixture has less entropy than the (entropy-maximising) Gaussian of a benign neuron. So:
per sample, take the spatial max of every BN input channel (the paper's "pre-activation",
Sec. 3.4), estimate each channel's entropy with a histogram, and prune the channels more than
u standard deviations below their layer's mean entropy.
"""
from __future__ import annotations

from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bdfast import ops
from bdfast._utils import check_number, distributed
from bdfast.defenses.pruning import (DEFAULT_ACC_BUDGET, ChannelStatistic, PruneResult,
                                     apply_preset, check_options, prune_outliers)

__all__ = ["dde_prune", "BACKDOORBENCH_SETTINGS"]

# What preset="backdoorbench" sets, and why: how BackdoorBench's defense/ep.py runs DDE
# (docs/pruning.md, "BackdoorBench preset").
BACKDOORBENCH_SETTINGS = {
    "step": (0.1, "the step_size of batch_entropy in BackdoorBench's defense/ep.py"),
    "reference_compat": (True, "ep.py's batch_entropy is the released estimator"),
    "zero_bias": (True, "ep.py's EP_defense zeroes beta with gamma"),
    "max_samples": (None, "ep.py's EP_defense reads the loader's whole first batch"),
}


def dde_prune(model: nn.Module, loader: Iterable, *, u: Union[float, str] = 3.0,
              step: float = 0.01, reference_compat: bool = False,
              max_samples: Optional[int] = None, val_loader: Optional[Iterable] = None,
              acc_budget: float = DEFAULT_ACC_BUDGET, zero_bias: bool = False,
              preset: Optional[str] = None, inplace: bool = False, device: Any = None,
              progress: bool = True) -> PruneResult:
    """Prune backdoor neurons by their low differential entropy on the training set.

    Args:
        model: the suspect model; it must contain affine BatchNorm layers (every one is scored,
            shortcut BNs included). A model without BatchNorm is refused before any data is
            read, with a ValueError that points to MEDIC and BCU.
        loader: the (poisoned) training images: an iterable of batches ``x [B, C, H, W]`` or
            ``(x, y)`` (labels ignored), without augmentation.
        u: a channel is pruned when its entropy is below ``mean - u * std`` of its layer's
            entropies (paper Sec. 4.4, ``tau_h = h_bar - u_h s_h``); 3 on CIFAR-10, 4 on
            Tiny-ImageNet. ``"auto"`` tries u from 5 down to 1 (:data:`~bdfast.defenses.pruning.
            AUTO_U_GRID`) and keeps the smallest whose pruning costs at most ``acc_budget`` of
            clean accuracy on ``val_loader``; the report's ``sweep`` records every u tried.
        step: histogram bin width in standardised units.
        reference_compat: use the released code's histogram estimator (docs/ops.md) instead of the
            paper's differential entropy ``-sum p ln(p / step)``.
        max_samples: use at most this many images (default: all the loader yields).
        val_loader: clean images held out from ``loader`` (``x`` or ``(x, y)``), needed by
            ``u="auto"`` only: the training set holds triggered images, so it cannot tell
            whether pruning hurts clean accuracy. Without labels, accuracy is agreement with the
            unpruned model's predictions.
        acc_budget: the clean accuracy (a fraction) ``u="auto"`` may give up on ``val_loader``.
        zero_bias: also zero the pruned channels' BN bias (beta).
        preset: ``"backdoorbench"`` runs DDE as BackdoorBench's ``defense/ep.py`` does
            (docs/pruning.md, "BackdoorBench preset"): the loader's first batch only, the
            BatchNorm2d layers only, the released estimator at ``step=0.1`` and beta zeroed with
            gamma (:data:`BACKDOORBENCH_SETTINGS`). An option left at its default takes the
            preset's value; another value than the preset's is a ValueError, as is
            ``u="auto"``. None: bdfast's own defaults.
        inplace: prune ``model`` itself instead of a deep copy.
        device: where to run (default: the model's device); with ``inplace`` the model moves.
        progress: show a progress bar over the statistics pass.

    Returns:
        :class:`~bdfast.defenses.pruning.PruneResult` with the pruned model and a report whose
        scores are the entropies h (NaN for a constant neuron, which is never pruned).

    Under ``torch.distributed`` every rank passes its shard of the data and the [N_rank, K]
    samples are gathered, so all ranks prune the same channels.
    """
    check_options(u, zero_bias, inplace, acc_budget)
    check_number(step, "step", note=" (the histogram bin width)")
    if not isinstance(reference_compat, bool):
        raise TypeError(f"reference_compat must be True or False, got {reference_compat!r}")
    check_number(max_samples, "max_samples", integer=True, minimum=2, allow_none=True)
    options = apply_preset(preset, dde_prune,
                           {"u": u, "step": step, "reference_compat": reference_compat,
                            "max_samples": max_samples, "acc_budget": acc_budget,
                            "zero_bias": zero_bias}, BACKDOORBENCH_SETTINGS)
    if u == "auto" and val_loader is None:
        raise ValueError("u='auto' needs val_loader=, a few hundred clean images held out from "
                         "the training set: DDE's own loader holds triggered images, so it cannot "
                         "measure what pruning costs on clean data")
    # The native kernel standardises with float64 moments rounded once, which puts a value lying
    # on a bin edge in the other bin for a few values in a million; the reference standardises
    # with float32 torch.mean and torch.std, as BackdoorBench does, and so bins as it does.
    statistic = SpatialMaxEntropy(options["step"], options["reference_compat"],
                                  options["max_samples"],
                                  backend="auto" if options["preset"] is None else "reference")
    return prune_outliers(model, loader, statistic, u=u, val_loader=val_loader,
                          acc_budget=acc_budget, zero_bias=options["zero_bias"], inplace=inplace,
                          device=device, progress=progress, options=options,
                          max_samples=options["max_samples"])


class SpatialMaxEntropy(ChannelStatistic):
    """DDE's statistic: per image and channel, the maximum over spatial positions of the BN
    input, phi [N, K] (paper Sec. 3.4); its score is the histogram entropy of each column
    (``ops.histogram_entropy`` on ``backend``), suspicious when low."""

    method, score_name, direction = "dde", "entropy", "low"

    def __init__(self, step: float, reference_compat: bool, max_samples: Optional[int],
                 backend: str = "auto"):
        self.step, self.reference_compat, self.max_samples = step, reference_compat, max_samples
        self.backend = backend
        self.blocks: List[List[Tensor]] = []
        self.phi: Optional[Tensor] = None

    def start(self, model: nn.Module, names: Sequence[str]) -> None:
        self.blocks = [[] for _ in names]

    def update(self, layer: int, x: Tensor) -> None:
        self.blocks[layer].append(x.flatten(2).amax(dim=2).float() if x.dim() > 2
                                  else x.float())

    def finish(self, seen: int, device: torch.device) -> Tuple[Tensor, int]:
        phi = torch.cat([torch.cat(b) for b in self.blocks], dim=1)  # [N, K]: layers side by side
        self.blocks = []
        if distributed():
            phi = _gather_rows(phi)[:self.max_samples]
        if phi.shape[0] < 2:
            raise ValueError(f"loader must yield at least 2 images to estimate entropies, got "
                             f"{phi.shape[0]}")
        self.phi = phi
        return torch.isfinite(phi).all(dim=0), phi.shape[0]

    def score(self, offsets: Tensor) -> Tensor:
        return ops.histogram_entropy(self.phi, offsets, step=self.step,
                                     reference_compat=self.reference_compat,
                                     backend=self.backend)


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
