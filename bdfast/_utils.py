"""Small helpers shared by the lab, the defenses and the command line."""
from __future__ import annotations

import contextlib
import math
import numbers
import random
import sys
import time
from typing import Any, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
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


def check_number(value: Any, name: str, *, integer: bool = False, minimum: Optional[float] = None,
                 allow_none: bool = False, note: str = "") -> Any:
    """``value`` unchanged, or a ValueError naming ``name`` and ``value`` in one sentence.

    ``value`` must be an int (``integer``) or a finite real number, never a bool, that is > 0,
    or >= ``minimum`` when given; ``None`` passes with ``allow_none``. ``note`` is added to the
    sentence to say what the option means, e.g. " (the histogram bin width)".
    """
    if allow_none and value is None:
        return value
    kind = int if integer else numbers.Real
    if isinstance(value, kind) and not isinstance(value, bool):
        low_ok = value > 0 if minimum is None else value >= minimum
        if low_ok and value < math.inf:  # NaN fails both comparisons
            return value
    noun = "int" if integer else "finite number"
    if minimum is None:
        wanted = f"a positive {noun}"
    else:
        wanted = f"{'an' if integer else 'a'} {noun} >= {minimum:g}"
    if allow_none:
        wanted = f"None or {wanted}"
    raise ValueError(f"{name} must be {wanted}{note}, got {value!r}")


def distributed() -> bool:
    """Whether a torch.distributed process group is running (launched with torchrun)."""
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every module of ``model`` is in eval mode, so that a forward pass does
    not move BatchNorm running statistics or drop units; afterwards each module gets its own
    train/eval flag back (``model.train(was_training)`` would flatten them into one)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


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


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` is a 4-D tensor laid out channels-last, and not also contiguous (as a
    tensor with 1x1 maps or one channel is, which either layout describes)."""
    return (x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))


def channels_innermost(x: Tensor) -> bool:
    """Whether ``x [B, C, *spatial]`` (3 dims or more) stores its channels innermost: dim 1 has
    stride 1 and the other dims are dense in order, i.e. ``x.movedim(1, -1)`` is contiguous.

    That is a 4-D channels_last map, and ``y.movedim(-1, 1)`` of a contiguous token or
    channels-last output ``y [B, *spatial, C]`` (a Linear's or a LayerNorm's). A tensor with
    one channel or one position per sample is both this and contiguous.
    """
    return x.dim() >= 3 and x.movedim(1, -1).is_contiguous()


def channels_last_hint(shape: Sequence[int]) -> str:
    """A hint to transpose when a 4-D image shape looks like [N, H, W, C]; else ""."""
    if len(shape) == 4 and shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4):
        return (f"; shape {tuple(shape)} looks like (N, H, W, C) images, transpose them to "
                "(N, C, H, W) with x.permute(0, 3, 1, 2)")
    return ""


class ImageDtypeError(TypeError, ValueError):
    """Images whose dtype is not floating point.

    A TypeError by kind; also a ValueError because the defenses' training loop and the lab's
    evaluate and train have always reported such images as one, and callers catch it as such.
    """


def check_images(x: Any, what: str = "x", *, any_rank: bool = False,
                 nonempty: bool = False) -> None:
    """One-sentence error naming ``what`` unless ``x`` is a floating-point image tensor
    [B, C, H, W].

    ``any_rank`` accepts any [B, C, *rest] of two or more dimensions (a defense takes whatever
    its model takes) and ``nonempty`` refuses B = 0. Raises TypeError for a non-tensor,
    :class:`ImageDtypeError` for a dtype that is not floating point and ValueError for a wrong
    shape. The values are checked apart, by :func:`check_pixel_range`.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    rank_ok = x.dim() >= 2 if any_rank else x.dim() == 4
    if x.is_floating_point() and rank_ok and not (nonempty and len(x) == 0):
        return
    error = ValueError if x.is_floating_point() else ImageDtypeError
    raise error(f"{what} must hold a {'non-empty ' if nonempty else ''}floating-point image "
                f"tensor {'[B, C, ...]' if any_rank else '[B, C, H, W]'}, got shape "
                f"{list(x.shape)} and dtype {x.dtype}")


def check_labelled_images(model: Any, x: Any, y: Any) -> None:
    """One-sentence errors unless ``model`` is a module, ``x`` a floating-point [N, C, H, W]
    tensor of images in [0, 1] (see :func:`check_pixel_range`) and ``y`` an int64 tensor [N]."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_images(x)
    if not isinstance(y, Tensor) or y.shape != (len(x),) or y.dtype != torch.long:
        raise ValueError(f"y must be an int64 tensor of shape [{len(x)}] matching x, got "
                         + (f"shape {tuple(y.shape)} {y.dtype}" if isinstance(y, Tensor)
                            else type(y).__name__))
    check_pixel_range(x)


def check_training_inputs(model: Any, x: Any, y: Any, *, epochs: Any, batch_size: Any) -> None:
    """The checks of a supervised run on ``(x [N, C, H, W], y [N] int64)``, each a one-sentence
    error: :func:`check_labelled_images`, at least 2 images (a batch of one breaks BatchNorm),
    labels >= 0, and positive int ``epochs`` and ``batch_size``."""
    check_labelled_images(model, x, y)
    if len(x) < 2:
        raise ValueError(f"x must hold at least 2 images to train with BatchNorm, got {len(x)}")
    if int(y.min()) < 0:
        raise ValueError(f"y must hold class indices >= 0, got {int(y.min())}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        check_number(value, name, integer=True)


def seeded_generator(seed: Optional[int]) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or from the OS's entropy when it is None."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches in one pass over ``n`` items: a trailing batch of a single item is left out,
    because it would break BatchNorm's batch statistics."""
    return n // batch_size + (1 if n % batch_size > 1 else 0)


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


@contextlib.contextmanager
def model_input_errors(model: nn.Module, x: Tensor, what: str = "the loader's images"
                       ) -> Iterator[None]:
    """Turn the RuntimeError of a forward of ``model`` on ``x [B, C, H, W]`` (wrong dtype,
    channel count or size) into one sentence saying what the images and the model are."""
    try:
        yield
    except RuntimeError as error:
        param = next(model.parameters(), None)
        held = f" (the model's parameters are {param.dtype})" if param is not None else ""
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"the model cannot run on {what} of shape {list(x.shape)} and dtype "
                         f"{x.dtype}{held}: {first}{channels_last_hint(x.shape)}") from error


def check_logits(output: Any, batch: int, who: str = "the model") -> None:
    """One-sentence error unless ``output`` is a logits tensor [batch, K]."""
    if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[0] != batch:
        got = (f"shape {list(output.shape)}" if isinstance(output, Tensor)
               else f"a {type(output).__name__}")
        raise ValueError(f"{who} must return one logits tensor [B, K] (B = {batch}), got {got}; "
                         "wrap a model that returns several outputs so it returns the logits")


def check_finite_parameters(model: nn.Module, when: str) -> None:
    """FloatingPointError naming the first parameter of ``model`` that is not finite."""
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise FloatingPointError(f"parameter {name!r} became non-finite {when}; lower lr "
                                     "(the loss was still finite, so the last update broke it)")


def check_not_tensor(loader: Any, what: str = "loader") -> None:
    """A bare tensor is iterable (over its rows), but it is not a loader of batches."""
    if isinstance(loader, Tensor):
        raise TypeError(f"{what} must be an iterable of batches x or (x, y), not a single tensor; "
                        "wrap the tensor with bdfast.loaders.tensor_loader(x)")


def iter_batches(loader: Iterable,
                 what: str = "loader") -> Iterator[Tuple[Tensor, Optional[Tensor]]]:
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


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream is no terminal
        return False


def _plural(count: int, unit: str) -> str:
    if count == 1:
        return f"1 {unit}"
    return f"{count} {unit}{'es' if unit.endswith(('s', 'sh', 'ch', 'x')) else 's'}"


class LineProgress:
    """What :func:`progress` gives when stderr is not a terminal (a CI log, a file, a pipe).

    A tqdm bar there writes a carriage-return redraw per update, which a log keeps as one
    endless line or as thousands. Instead, over a loop of epochs (``unit="epoch"``) this
    prints one line on stderr per finished epoch, ``train: epoch 3/30, loss=0.1234 (1.2s)``,
    with whatever the loop gave :meth:`set_postfix`; over any other loop (the batches of a
    statistics pass, the demo's defenses) it prints one line when the loop ends,
    ``dde statistics: 12 batches in 3.4s``.
    """

    def __init__(self, iterable: Iterable, *, desc: Optional[str] = None, unit: str = "it",
                 total: Optional[int] = None, initial: int = 0, **_ignored: Any) -> None:
        self.iterable = iterable
        self.desc = desc or "progress"
        self.unit = unit
        self.initial = initial
        if total is None and hasattr(iterable, "__len__"):
            total = initial + len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.postfix: dict = {}

    def set_postfix(self, ordered_dict: Optional[dict] = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        """Like tqdm's: ``key=value`` pairs shown with the next line."""
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def _epoch_line(self, done: int, seconds: float) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        details = "".join(f", {key}={value}" for key, value in self.postfix.items())
        return f"{self.desc}: {self.unit} {done}{of}{details} ({seconds:.1f}s)"

    def __iter__(self) -> Iterator:
        per_iteration = self.unit == "epoch"
        done = self.initial
        start = time.perf_counter()
        for item in self.iterable:
            started = time.perf_counter()
            yield item  # the loop's body runs here, then asks for the next item
            done += 1
            if per_iteration:
                print(self._epoch_line(done, time.perf_counter() - started), file=sys.stderr,
                      flush=True)
        if not per_iteration:
            print(f"{self.desc}: {_plural(done - self.initial, self.unit)} in "
                  f"{time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)


def progress(iterable: Iterable, *, enabled: bool = True, **kwargs: Any) -> Iterable:
    """``iterable`` with its progress shown, when ``enabled``.

    On a terminal that is a tqdm bar (when tqdm is installed); when stderr is not a terminal, a
    :class:`LineProgress`: one line per finished epoch (``unit="epoch"``), or one line at the
    end of any other loop. ``kwargs`` are tqdm's (``desc``, ``unit``, ``total``, ``initial``).
    """
    if not enabled:
        return iterable
    if not _stderr_is_terminal():
        return LineProgress(iterable, **kwargs)
    if _tqdm is None:
        return iterable
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return _tqdm(iterable, **kwargs)
