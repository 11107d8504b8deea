"""Finding the layers a defense looks at, capturing their activations with forward hooks, and
keeping the user's own hooks out of a defense's passes.

Every defense works on copies of the user's model; the helpers here never change a model's
weights. :func:`disable_inplace` only flips ``inplace`` flags, and only on the copies.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
NORM = BATCHNORM + (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                    nn.InstanceNorm3d)
LINEAR = (nn.Linear,)
# nn.MultiheadAttention applies its out_proj's weights functionally, so a hook on out_proj never
# fires; the presets that hook Linear layers hook the attention module's output instead.
ATTENTION = (nn.MultiheadAttention,)
ACTIVATION = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
              nn.SiLU, nn.Mish, nn.Hardswish, nn.Softplus)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def residual_blocks(model: nn.Module) -> List[str]:
    """Names of the *blocks* of ``model``: modules with children of their own that are not
    containers themselves and sit directly in a container (``nn.Sequential`` / ``ModuleList``
    / ``ModuleDict``). That is how residual nets stack their blocks (a ResNet's ``layer1[0]``,
    a ConvNeXt stage's blocks), so a block's output is the residual stream between blocks."""
    blocks = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, CONTAINERS):
            continue
        for child_name, child in parent.named_children():
            if not isinstance(child, CONTAINERS) and next(child.children(), None) is not None:
                blocks.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return blocks


# A preset is either module types or a function of the model that names modules.
LAYER_PRESETS: Dict[str, Union[Tuple[type, ...], Callable[[nn.Module], List[str]]]] = {
    "conv+norm+linear": CONV + NORM + LINEAR + ATTENTION,
    "conv+bn": CONV + BATCHNORM,
    "conv+linear": CONV + LINEAR + ATTENTION,
    "bn": BATCHNORM,
    "act+linear": ACTIVATION + LINEAR + ATTENTION,
    "block+linear": lambda model: residual_blocks(model) + [
        name for name, m in model.named_modules() if isinstance(m, LINEAR + ATTENTION)],
}

LayerSpec = Union[str, Sequence[Union[str, type]], Callable[[str, nn.Module], bool]]


def select_layers(model: nn.Module, layers: LayerSpec = "conv+norm+linear") -> List[str]:
    """Names of the modules of ``model`` to hook, in registration order.

    ``layers`` is a preset name (see ``LAYER_PRESETS``), a sequence of module types and/or
    module names, or a predicate ``(name, module) -> bool``. The choice is by name and type
    only, so it may include modules whose forward never runs (an attention's ``out_proj``);
    :func:`feature_axes` finds those.
    """
    modules = dict(model.named_modules())
    if isinstance(layers, str):
        if layers not in LAYER_PRESETS:
            raise ValueError(f"layers must be one of {sorted(LAYER_PRESETS)}, a list of module "
                             f"types or names, or a predicate; got {layers!r}")
        preset = LAYER_PRESETS[layers]
        if callable(preset):
            picked = set(preset(model))
            chosen = [n for n in modules if n in picked]
        else:
            chosen = [n for n, m in modules.items() if isinstance(m, preset)]
    elif callable(layers) and not isinstance(layers, type):
        chosen = [n for n, m in modules.items() if n and layers(n, m)]
    else:
        specs = list(layers)
        unknown = [s for s in specs if isinstance(s, str) and s not in modules]
        if unknown:
            raise ValueError(f"layers names modules that the model does not have: {unknown}")
        types = tuple(s for s in specs if isinstance(s, type))
        names = {s for s in specs if isinstance(s, str)}
        chosen = [n for n, m in modules.items() if n in names or (types and isinstance(m, types))]
    if not chosen:
        raise ValueError(f"layers={layers!r} selects no module of the model")
    return chosen


def disable_inplace(model: nn.Module) -> int:
    """Set ``inplace=False`` on every module that has the flag (ReLU, Dropout, ...).

    A hooked output that a later in-place activation overwrites would otherwise hold the
    activation's values instead of the layer's. Returns how many modules were changed.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
            changed += 1
    return changed


class Tap:
    """Captures the outputs of named modules during forward passes.

    Use as a context manager (entering it forgets earlier captures); after a forward,
    :meth:`values` returns the captured tensors in the order of ``names``, also after the
    context has exited. A module that runs twice in one forward is an error: its two
    activations would need two different statistics, which the defenses do not define. Of an
    nn.MultiheadAttention's ``(output, weights)`` the output is captured.

    Args:
        model: the model to hook.
        names: module names, e.g. from :func:`select_layers`.
        clone: names of layers whose output a functional in-place operation
            (``F.relu(x, inplace=True)``) overwrites afterwards. The hook keeps the layer's own
            output and hands a clone on to the rest of the model, so the in-place op overwrites
            the clone: the captured tensor keeps the layer's values *and* stays the tensor the
            loss depends on, so gradients w.r.t. it are the layer's (a captured clone would be
            outside the graph).
        require_grad: make captured outputs part of the autograd graph even when the model's
            parameters are frozen, so that gradients w.r.t. them can be taken.
        detach: store detached tensors (statistics collection).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], *, clone: Iterable[str] = (),
                 require_grad: bool = False, detach: bool = False):
        modules = dict(model.named_modules())
        self.names = list(names)
        self._modules = [modules[n] for n in self.names]
        self.clone = set(clone)
        self.require_grad = require_grad
        self.detach = detach
        self._values: Dict[str, Tensor] = {}
        self._versions: Dict[str, int] = {}
        self._handles: list = []

    def __enter__(self) -> "Tap":
        self.clear()
        for name, module in zip(self.names, self._modules):
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            output, rest = _first_output(module, output)
            if not isinstance(output, Tensor):
                raise TypeError(f"module {name!r} produced a {type(output).__name__}, not a "
                                "tensor; exclude it with layers=")
            if name in self._values:
                raise RuntimeError(f"module {name!r} ran twice in one forward pass; hooked layers "
                                   "must run once per forward, so exclude it with layers=")
            if self.require_grad and not output.requires_grad:
                output.requires_grad_(True)  # a leaf when the layer's parameters are frozen
            # The model continues with (and overwrites) the clone.
            handed_on = output.clone() if name in self.clone else None
            if self.detach:
                output = output.detach()
            self._values[name] = output
            self._versions[name] = output._version
            if handed_on is not None and rest:
                return (handed_on, *rest)
            return handed_on  # None keeps the module's output
        return hook

    def clear(self) -> None:
        """Forget the last forward's activations (call before each forward)."""
        self._values.clear()
        self._versions.clear()

    def values(self) -> List[Tensor]:
        """The captured tensors in the order of ``names``; every module must have run."""
        missing = [n for n in self.names if n not in self._values]
        if missing:
            raise RuntimeError(f"hooked modules did not run in the forward pass: {missing}")
        return [self._values[n] for n in self.names]

    def modified_in_place(self) -> List[str]:
        """Names whose captured tensor was changed in place after it was captured."""
        return [n for n, v in self._values.items() if v._version != self._versions[n]]


def _first_output(module: nn.Module, output: Any) -> Tuple[Any, tuple]:
    """The activation of a module's output and what else it returns: nn.MultiheadAttention
    returns ``(attention output, attention weights or None)``, whose first element is hooked."""
    if isinstance(module, ATTENTION) and isinstance(output, tuple) and output:
        return output[0], output[1:]
    return output, ()


# Modules that say how many features their output has, the attribute that says it, and the dim
# of an [B, ...] output of `ndim` dims they put them on.
_FEATURE_MODULES: Tuple[Tuple[Tuple[type, ...], str, Callable[[nn.Module, int], int]], ...] = (
    (CONV + (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), "out_channels",
     lambda m, ndim: 1),
    (BATCHNORM + (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), "num_features",
     lambda m, ndim: 1),
    ((nn.GroupNorm,), "num_channels", lambda m, ndim: 1),
    ((nn.Linear,), "out_features", lambda m, ndim: ndim - 1),
    ((nn.Embedding,), "embedding_dim", lambda m, ndim: ndim - 1),
    ((nn.MultiheadAttention,), "embed_dim", lambda m, ndim: ndim - 1),
    # LayerNorm([C, H, W]) normalises the last three dims: its features are the first of them.
    ((nn.LayerNorm,), "normalized_shape", lambda m, ndim: ndim - len(m.normalized_shape)),
)


def _known_features(module: nn.Module) -> Optional[Tuple[int, Optional[Callable[[int], int]]]]:
    """``(feature count, ndim -> axis)`` of a module that says how many features it makes, or
    None. The axis function is None for a subclass with its own forward (torchvision's
    ``LayerNorm2d`` permutes to normalise dim 1), whose axis only its output shape can tell."""
    for types, attribute, axis in _FEATURE_MODULES:
        if isinstance(module, types):
            base = next(t for t in types if isinstance(module, t))
            count = getattr(module, attribute)
            count = count[0] if isinstance(count, (tuple, list)) else count
            own_forward = type(module).forward is not base.forward
            return int(count), None if own_forward else (
                lambda ndim, m=module, where=axis: where(m, ndim))
    return None


def feature_axes(model: nn.Module, names: Sequence[str], x: Tensor, *,
                 required: Iterable[str] = ()) -> Dict[str, int]:
    """The feature (channel) axis of each hooked output, from one probe forward of ``model``
    on ``x [B, ...]`` (run as it is, without gradients): ``{name: axis}`` for the ``names``
    whose forward ran, in their order.

    A conv, BatchNorm, GroupNorm or InstanceNorm output ``[B, C, *spatial]`` has its features
    on dim 1; a Linear, LayerNorm or nn.MultiheadAttention output on tokens ``[B, L, C]`` or
    on a channels-last map ``[B, H, W, C]`` on the last dim (the module's ``out_features``,
    ``normalized_shape`` or ``embed_dim`` says how many). A module that does not say (an
    activation, Identity, Dropout, a block), or a subclass with its own forward whose count
    fits both dim 1 and the last dim, takes the count of the last module that says and ran
    before it: its features are on whichever of dim 1 and the last dim has that many. If both
    do, an output of that module's shape keeps its axis when it is dim 1 or the output has 3
    dims (tokens); a 4-D map after a Linear or LayerNorm on channels-last maps may have been
    permuted back (as ConvNeXt blocks do), so that is undecided. A 2-D output ``[B, C]`` has
    them on dim 1.

    A name that did not run (nn.MultiheadAttention's ``out_proj``, whose weights the attention
    applies itself), or whose output does not hold one sample per row of dim 0 (a Swin window
    attention's ``[B * windows, tokens, C]``, an attention without ``batch_first``), is left
    out, or is a ValueError if it is in ``required`` (the layers a user named). An output whose
    axis cannot be decided is a ValueError naming the layer and its shape.
    """
    modules, required = dict(model.named_modules()), list(required)
    ran: List[Tuple[str, nn.Module, torch.Size]] = []  # in the order their forwards finished

    def record(name: str):
        def hook(module, inputs, output):
            output, _ = _first_output(module, output)
            if isinstance(output, Tensor):
                ran.append((name, module, output.shape))
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    first: Dict[str, int] = {}
    for index, (name, _, _) in enumerate(ran):
        first.setdefault(name, index)
    missing = [n for n in required if n not in first]
    if missing:
        raise ValueError(f"layers names modules whose forward never runs: {missing} (nn."
                         "MultiheadAttention applies its out_proj's weights itself, for example: "
                         "hook the attention module instead)")
    axes = {}
    decided: Dict[int, Tuple[Optional[int], str]] = {}
    for name in names:
        if name not in first:
            continue
        _, module, shape = ran[first[name]]
        where = f"layer {name!r} (output shape {list(shape)})"
        if len(shape) < 2 or shape[0] != len(x) or (
                isinstance(module, ATTENTION) and not module.batch_first):
            if name not in required:
                continue  # e.g. a Swin window attention's [B * windows, tokens, C]
            raise ValueError(f"{where} does not hold the batch of {len(x)} samples on dim 0 "
                             "followed by features (an nn.MultiheadAttention needs "
                             "batch_first=True); choose other layers with layers=")
        axis, why = _decide_axis(ran, first[name], decided)
        if axis is None:
            raise ValueError(f"cannot tell the feature axis of {where}: {why}; choose layers "
                             "whose features are clear with layers= (e.g. the Linear, conv or "
                             "norm layers that feed it)")
        axes[name] = axis
    return axes


def _decide_axis(ran: Sequence[Tuple[str, nn.Module, torch.Size]], index: int,
                 decided: Dict[int, Tuple[Optional[int], str]]) -> Tuple[Optional[int], str]:
    """``(axis or None, why not)`` of the output of ``ran[index]`` (see :func:`feature_axes`),
    memoised in ``decided``."""
    if index in decided:
        return decided[index]
    _, module, shape = ran[index]
    known = _known_features(module)
    if len(shape) == 2:
        result: Tuple[Optional[int], str] = (1, "")
    elif known is not None and (known[1] is not None
                                or _axis_by_count(shape, known[0], None) is not None):
        result = (_axis_by_count(shape, known[0], known[1]),
                  f"it has {known[0]} features, {_fit(shape, known[0])}")
    else:
        feeder = next((i for i in range(index - 1, -1, -1)
                       if _known_features(ran[i][1]) is not None), None)
        if feeder is None:
            result = (None, "no module that says its feature count ran before it")
        else:
            f_name, f_module, f_shape = ran[feeder]
            count = (known or _known_features(f_module))[0]
            axis = _axis_by_count(shape, count, None)
            if axis is None and f_shape == shape and shape[1] == shape[-1] == count:
                # Dim 1 and the last dim both fit. A map of the feeder's shape keeps its
                # channels on dim 1 after a conv-style feeder, and tokens keep theirs last;
                # a channels-last feeder's map may have been permuted back to NCHW (a ConvNeXt
                # block's output), which the shapes cannot tell.
                f_axis = _decide_axis(ran, feeder, decided)[0]
                if f_axis == 1 or len(shape) == 3:
                    axis = f_axis
            result = (axis, f"it takes its features from {f_name!r} (output shape "
                            f"{list(f_shape)}, {count} features), {_fit(shape, count)}")
    decided[index] = result
    return result


def _fit(shape: torch.Size, count: int) -> str:
    """Says which of dim 1 and the last dim of ``shape`` have ``count`` entries."""
    both = shape[1] == count and shape[-1] == count
    return (f"and both dim 1 and the last dim have {count} entries" if both
            else f"and neither dim 1 nor the last dim has {count} entries")


def _axis_by_count(shape: torch.Size, count: int,
                   natural: Optional[Callable[[int], int]]) -> Optional[int]:
    """The dim of ``shape [B, ...]`` that holds ``count`` features: where the module puts them
    (``natural``), or else the one of dim 1 and the last dim of that size; None if neither or
    both (2-D: dim 1)."""
    ndim = len(shape)
    if ndim == 2:
        return 1
    if natural is not None and shape[natural(ndim)] == count:
        return natural(ndim)
    fits = {d for d in (1, ndim - 1) if shape[d] == count}
    return fits.pop() if len(fits) == 1 else None


def find_inplace_overwrites(model: nn.Module, names: Sequence[str], x: Tensor) -> List[str]:
    """Run one forward of ``model`` on ``x`` and return the hooked names it overwrites in place.

    Catches functional in-place ops (``F.relu(x, inplace=True)``) that :func:`disable_inplace`
    cannot switch off; their layers must be captured with ``clone=`` (and a warning is due).
    """
    with torch.no_grad(), Tap(model, names) as tap:
        model(x)
        return tap.modified_in_place()


def warn_inplace(names: Sequence[str], what: str) -> None:
    """The one warning a defense gives when it has to clone overwritten activations."""
    if names:
        warnings.warn(f"{what}: the model overwrites the hooked activations of {len(names)} "
                      f"layer(s) in place (e.g. F.relu(x, inplace=True)): {list(names)[:5]}; "
                      "they are cloned in the hook, which costs memory and time.",
                      RuntimeWarning, stacklevel=3)


# The per-module dicts of the hooks that run in a forward or backward pass.
_PASS_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
               "_backward_hooks")


@contextlib.contextmanager
def hooks_set_aside(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block no module of ``model`` has forward or backward hooks; the user's hooks
    are put back afterwards.

    A defense runs a model many times (statistics, every training step); a user's hook (a
    logger, a feature extractor) must not fire there. Hooks that the block registers itself
    are removed with their handles as usual.
    """
    saved = []
    for module in model.modules():
        for attr in _PASS_HOOKS:
            hooks = getattr(module, attr, None)
            if hooks:
                saved.append((module, attr, hooks))
                setattr(module, attr, OrderedDict())
    try:
        yield model
    finally:
        for module, attr, hooks in saved:
            setattr(module, attr, hooks)


def copy_without_hooks(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without its forward and backward hooks (see
    :func:`hooks_set_aside`); the model itself keeps them."""
    with hooks_set_aside(model):
        return copy.deepcopy(model)
