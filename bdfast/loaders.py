"""In-memory tensors as a DataLoader: the loader :func:`bdfast.defenses.run` builds from tensors,
and the one-liner a user needs to hand tensors to :func:`bdfast.medic_clone` and the others."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from bdfast._utils import check_number, seeded_generator

__all__ = ["tensor_loader"]


class _TensorBatches:
    """Indexable by a list of indices, so the DataLoader gathers a whole batch in one indexing op
    instead of collating one small tensor per sample."""

    def __init__(self, x: Tensor, y: Optional[Tensor]):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, indices: List[int]) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.x.device)
        if self.y is None:
            return self.x[idx]
        return self.x[idx], self.y[idx.to(self.y.device)]


def tensor_loader(x: Tensor, y: Optional[Tensor] = None, batch_size: int = 64,
                  shuffle: bool = False, seed: Optional[int] = None) -> DataLoader:
    """A DataLoader over in-memory tensors yielding ``x [b, ...]`` or ``(x [b, ...], y [b])``.

    ``x`` is ``[N, ...]`` and ``y`` (optional) is ``[N]``. With ``shuffle`` the order is drawn from
    a generator seeded with ``seed`` (fresh randomness when ``seed`` is None). The last batch may
    be smaller than ``batch_size``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or len(x) == 0:
        raise ValueError(f"x must be a non-empty tensor [N, ...], got shape {tuple(x.shape)}")
    if y is not None:
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor or None, got {type(y).__name__}")
        if y.dim() != 1 or len(y) != len(x):
            raise ValueError(f"y must have shape [{len(x)}] to match x, got {tuple(y.shape)}")
    check_number(batch_size, "batch_size", integer=True)
    dataset = _TensorBatches(x, y)
    if shuffle:
        sampler: Any = RandomSampler(range(len(x)), generator=seeded_generator(seed))
    else:
        sampler = SequentialSampler(range(len(x)))
    # batch_size=None turns off the DataLoader's own batching: the sampler hands whole index
    # lists to _TensorBatches.
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False),
                      batch_size=None, collate_fn=_as_is)


def _as_is(batch: Any) -> Any:
    # The default conversion would turn the (x, y) tuple into a list.
    return batch
