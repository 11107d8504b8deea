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
from typing import Callable, Dict, Iterable, Iterator, List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
NORM = BATCHNORM + (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                    nn.InstanceNorm3d)
LINEAR = (nn.Linear,)
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
    "conv+norm+linear": CONV + NORM + LINEAR,
    "conv+bn": CONV + BATCHNORM,
    "conv+linear": CONV + LINEAR,
    "bn": BATCHNORM,
    "act+linear": ACTIVATION + LINEAR,
    "block+linear": lambda model: residual_blocks(model) + [
        name for name, m in model.named_modules() if isinstance(m, LINEAR)],
}

LayerSpec = Union[str, Sequence[Union[str, type]], Callable[[str, nn.Module], bool]]


def select_layers(model: nn.Module, layers: LayerSpec = "conv+norm+linear") -> List[str]:
    """Names of the modules of ``model`` to hook, in registration order.

    ``layers`` is a preset name (see ``LAYER_PRESETS``), a sequence of module types and/or
    module names, or a predicate ``(name, module) -> bool``.
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
    activations would need two different statistics, which the defenses do not define.

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
