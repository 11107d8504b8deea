"""Small helpers shared by the lab, the defenses and the command line."""
from __future__ import annotations

import random
from typing import Any, Iterable, Iterator, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

try:
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # tqdm is a dependency, but a missing progress bar must never stop a run
    _tqdm = None


def seed_everything(seed: Optional[int]) -> None:
    """Seed Python, NumPy and torch so that a CPU run is reproducible; ``None`` does nothing."""
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(device: Any, model: Optional[nn.Module] = None) -> torch.device:
    """``device`` if given, else the device of the model's first parameter, else the CPU."""
    if device is not None:
        return torch.device(device)
    if model is not None:
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def check_labelled_images(model: Any, x: Any, y: Any) -> None:
    """One-sentence errors unless ``model`` is a module, ``x`` a floating-point [N, C, H, W]
    tensor and ``y`` an int64 tensor [N]."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError("x must be a floating-point image tensor [N, C, H, W], got "
                         + (f"shape {tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor)
                            else type(x).__name__))
    if not isinstance(y, Tensor) or y.shape != (len(x),) or y.dtype != torch.long:
        raise ValueError(f"y must be an int64 tensor of shape [{len(x)}] matching x, got "
                         + (f"shape {tuple(y.shape)} {y.dtype}" if isinstance(y, Tensor)
                            else type(y).__name__))


def split_batch(batch: Any, what: str = "loader") -> Tuple[Tensor, Optional[Tensor]]:
    """Return ``(x, y)`` of a batch that is ``x`` or ``(x, y, ...)``; ``y`` is None if absent.

    Raises a one-sentence ``TypeError`` naming ``what`` for anything else.
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) > 1 else None
        if y is not None and not isinstance(y, Tensor):
            raise TypeError(f"{what} must yield tensors x or tuples (x, y) of tensors, "
                            f"got a label of type {type(y).__name__}")
        return batch[0], y
    raise TypeError(f"{what} must yield tensors x or tuples (x, y) of tensors, "
                    f"got {type(batch).__name__}")


def iter_batches(loader: Iterable, what: str = "loader") -> Iterator[Tuple[Tensor, Optional[Tensor]]]:
    """Iterate ``(x, y or None)`` over a loader, failing clearly if it yields nothing."""
    empty = True
    for batch in loader:
        empty = False
        yield split_batch(batch, what)
    if empty:
        raise ValueError(f"{what} is empty: it yielded no batches")


def progress(iterable: Iterable, *, enabled: bool = True, **kwargs) -> Iterable:
    """A tqdm progress bar over ``iterable`` when ``enabled`` and tqdm is installed."""
    if not enabled or _tqdm is None:
        return iterable
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return _tqdm(iterable, **kwargs)
