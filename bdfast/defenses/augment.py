"""Data augmentation inside the distillation defenses: batched random crop (and flip) on device.

The MEDIC and BCU papers train their students on augmented batches (random crop with padding
and horizontal flip, the CIFAR recipe); ``augment=`` of :func:`bdfast.medic_clone` and
:func:`bdfast.bcu_cleanse` turns it on. Both the teacher and the student see the same
augmented batch. The offsets and flips are drawn on the CPU from a generator of their own
(seeded by the defense's ``seed``), so a seed gives the same augmentation on any device, and the
crop itself is one gather on the batch's device.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from bdfast._utils import is_channels_last

__all__ = ["AUGMENTS", "AugmentSpec", "RandomCrop", "resolve_augment"]

# ``augment=True`` means the papers' recipe; "crop" leaves out the flip, for images such as
# digits or text whose mirror image is another class's.
AUGMENTS = ("crop", "crop+flip")
AugmentSpec = Union[bool, str, None]


def resolve_augment(augment: AugmentSpec) -> Optional[str]:
    """``None`` (off) or one of :data:`AUGMENTS`; a ValueError in one sentence otherwise."""
    if augment is None or augment is False:
        return None
    if augment is True:
        return "crop+flip"
    if isinstance(augment, str) and augment in AUGMENTS:
        return augment
    raise ValueError(f"augment must be False, True or one of {list(AUGMENTS)}, got {augment!r}")


class RandomCrop:
    """``crop(x [B, C, H, W]) -> [B, C, H, W]``: each image zero-padded by ``padding`` pixels on
    every side and cut back to H x W at a random offset, then, with ``flip``, mirrored left-right
    with probability 1/2.

    ``padding`` defaults to ``max(1, round(min(H, W) / 8))``: 4 pixels on 32 x 32 images (the
    CIFAR recipe), 2 on 16 x 16. ``seed`` seeds the CPU generator that draws the offsets and
    flips; ``None`` draws that seed from torch's global RNG (which the defenses' own ``seed``
    sets). ``generator`` draws from a CPU generator the caller shares instead (the lab's trainer
    draws its batch order from the same one).
    """

    def __init__(self, *, flip: bool, padding: Optional[int] = None,
                 seed: Optional[int] = None, generator: Optional[torch.Generator] = None):
        if padding is not None and (isinstance(padding, bool) or not isinstance(padding, int)
                                    or padding < 0):
            raise ValueError(f"padding must be None or an int >= 0, got {padding!r}")
        self.flip, self.padding = flip, padding
        if generator is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()))
            generator = torch.Generator().manual_seed(seed)
        self.generator = generator

    @classmethod
    def from_spec(cls, augment: AugmentSpec, seed: Optional[int] = None) -> Optional["RandomCrop"]:
        """The augmentation that ``augment=`` of a defense names, or ``None`` when it is off."""
        kind = resolve_augment(augment)
        return None if kind is None else cls(flip=kind == "crop+flip", seed=seed)

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"augment needs image batches [B, C, H, W], got shape {list(x.shape)}")
        n, _, height, width = x.shape
        pad = self.padding if self.padding is not None else max(1, round(min(height, width) / 8))
        top = torch.randint(0, 2 * pad + 1, (n,), generator=self.generator)
        left = torch.randint(0, 2 * pad + 1, (n,), generator=self.generator)
        mirrored = torch.rand(n, generator=self.generator) < 0.5 if self.flip else None
        if pad == 0 and mirrored is None:
            return x
        rows = top[:, None] + torch.arange(height)  # [B, H] rows of the padded image
        columns = torch.arange(width).expand(n, width)
        if mirrored is not None:
            columns = torch.where(mirrored[:, None], columns.flip(1), columns)
        columns = left[:, None] + columns  # [B, W]
        padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # [B, H+2p, W+2p, C]
        index = torch.arange(n)[:, None, None]
        rows, columns, index = (t.to(x.device) for t in (rows, columns, index))
        out = padded[index, rows[:, :, None], columns[:, None, :]]  # [B, H, W, C]
        # Keep a channels-last batch channels-last.
        layout = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        return out.permute(0, 3, 1, 2).contiguous(memory_format=layout)
