"""Exact per-channel moments accumulated over a whole loader (float64, Chan/Welford merge)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from bdfast._utils import distributed


class ChannelMoments:
    """Running count, mean and sum of squared deviations of each channel of a batch of
    activations, whose channels lie on dim ``axis``: 1 for [B, C, *spatial] (conv outputs),
    -1 for [B, L, C] tokens or [B, H, W, C] channels-last maps (Linear, LayerNorm outputs).

    Batches are merged with Chan et al.'s parallel update in float64, so the result equals a
    two-pass computation over all samples and other positions up to float64 rounding, for
    any batch sizes. :meth:`all_reduce` merges the moments of all ranks the same way.
    """

    def __init__(self, axis: int = 1) -> None:
        self.axis = axis
        # [C] float64 (a count per channel keeps merges simple)
        self.count: Optional[Tensor] = None
        self.mean: Optional[Tensor] = None    # [C] float64
        self.m2: Optional[Tensor] = None      # [C] float64

    def update(self, x: Tensor) -> None:
        """Add a batch x [B, ...] with C channels on dim ``axis`` (any float dtype, device)."""
        if x.dim() < 2 or not -x.dim() < self.axis < x.dim() or self.axis % x.dim() == 0:
            raise ValueError(f"expected an activation [B, ...] with channels on dim {self.axis} "
                             f"(not the batch), got shape {list(x.shape)}")
        channels = x.shape[self.axis]
        per_channel = x.detach().double().movedim(self.axis, 0).reshape(channels, -1)
        n = torch.full((channels,), float(per_channel.shape[1]), dtype=torch.float64,
                       device=x.device)
        mean = per_channel.mean(dim=1)
        m2 = (per_channel - mean[:, None]).square().sum(dim=1)
        self._merge(n, mean, m2)

    def _merge(self, n: Tensor, mean: Tensor, m2: Tensor) -> None:
        if self.count is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        if n.shape != self.count.shape:
            raise ValueError(f"a batch with {n.shape[0]} channels cannot be merged into moments "
                             f"of {self.count.shape[0]} channels")
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def all_reduce(self) -> None:
        """Merge the moments of every rank of the default process group (no-op without one)."""
        if not distributed() or self.count is None:
            return
        local = torch.stack([self.count, self.mean, self.m2])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        self.count = self.mean = self.m2 = None
        for part in gathered:
            self._merge(part[0], part[1], part[2])

    def _require(self) -> None:
        if self.count is None:
            raise ValueError("no activations were accumulated: the loader yielded no batches")

    def variance(self, unbiased: bool = True) -> Tensor:
        """[C] float64 variance; unbiased divides by count - 1 (NaN for a single value)."""
        self._require()
        return self.m2 / (self.count - 1 if unbiased else self.count)

    def std(self, unbiased: bool = True) -> Tensor:
        """[C] float64 standard deviation."""
        return self.variance(unbiased).sqrt()
