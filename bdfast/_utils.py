"""Small helpers shared by the lab, the defenses and the command line."""
from __future__ import annotations

import random
from typing import Any, Iterable, Iterator, Optional, Sequence, Tuple

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


# Images scaled to [0, 1] never exceed 1, and standardised images ((x - mean) / std) have
# negative values; non-negative images above this bound hold raw pixel values such as 0..255.
PIXEL_RANGE_BOUND = 2.0


def check_pixel_range(x: Tensor, what: str = "x") -> None:
    """One-sentence error when float images ``x [N, C, H, W]`` look like 0..255 pixel values.

    A model trained on images in [0, 1] "cleans" nothing useful from 0..255 inputs, and the
    attacks of the lab are defined on [0, 1], so this common preprocessing mistake is refused.
    """
    if not x.is_floating_point() or x.numel() == 0:
        return
    low, high = float(x.amin()), float(x.amax())
    if low >= 0 and high > PIXEL_RANGE_BOUND:
        raise ValueError(f"{what} holds values from {low:g} to {high:g}: these look like 0..255 "
                         "pixel values, but images must be scaled to [0, 1] (divide by 255)")


def channels_last_hint(shape: Sequence[int]) -> str:
    """A hint to transpose when a 4-D image shape looks like [N, H, W, C]; else ""."""
    if len(shape) == 4 and shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4):
        return (f"; shape {tuple(shape)} looks like (N, H, W, C) images, transpose them to "
                "(N, C, H, W) with x.permute(0, 3, 1, 2)")
    return ""


def check_labelled_images(model: Any, x: Any, y: Any) -> None:
    """One-sentence errors unless ``model`` is a module, ``x`` a floating-point [N, C, H, W]
    tensor of images in [0, 1] (see :func:`check_pixel_range`) and ``y`` an int64 tensor [N]."""
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
    check_pixel_range(x)


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


def check_not_tensor(loader: Any, what: str = "loader") -> None:
    """A bare tensor is iterable (over its rows), but it is not a loader of batches."""
    if isinstance(loader, Tensor):
        raise TypeError(f"{what} must be an iterable of batches x or (x, y), not a single tensor; "
                        "wrap the tensor with bdfast.data.tensor_loader(x)")


def iter_batches(loader: Iterable, what: str = "loader") -> Iterator[Tuple[Tensor, Optional[Tensor]]]:
    """Iterate ``(x, y or None)`` over a loader, failing clearly if it yields nothing."""
    empty = True
    for batch in loader:
        empty = False
        yield split_batch(batch, what)
    if empty:
        raise ValueError(f"{what} is empty: it yielded no batches")


def write(line: str) -> None:
    """Print ``line`` above any running progress bar instead of gluing it to one."""
    if _tqdm is None:
        print(line)
    else:
        _tqdm.write(line)


def progress(iterable: Iterable, *, enabled: bool = True, **kwargs) -> Iterable:
    """A tqdm progress bar over ``iterable`` when ``enabled`` and tqdm is installed."""
    if not enabled or _tqdm is None:
        return iterable
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return _tqdm(iterable, **kwargs)
