"""Fresh parameters for any module: ``reset_parameters()`` where the module has one, else a rule
for the bare parameters that vision transformers and ConvNeXts hold.

MEDIC's student is the teacher's architecture with every parameter drawn anew, and BCU's
replacement values come from a freshly initialised copy of a layer. PyTorch's layers re-draw
their own parameters with ``reset_parameters()``; the parameters that torchvision and timm
models hold directly (a class token, a position embedding, a layer scale, a relative position
bias table) have none, so :data:`RULES` gives each the initialisation those libraries' own
constructors use. A rule is keyed on the parameter's name (the last part of its dotted name)
and its shape, never on the module's class, so that a model defined elsewhere with the same
conventions is covered too:

=============================== ============================ =================================
parameter (name, shape)          fresh value                  taken from
=============================== ============================ =================================
``class_token`` [1, k, C]        zeros                        torchvision VisionTransformer
``cls_token``, ``reg_token``     normal, std 1e-6             timm VisionTransformer
[1, k, C]
``dist_token`` [1, k, C]         trunc. normal, std 0.02      timm DeiT (distilled)
``pos_embedding`` [1, L, C]      normal, std 0.02             torchvision Encoder
``pos_embed`` [1, ...]           trunc. normal, std 0.02      timm VisionTransformer
``relative_position_bias_table`` trunc. normal, std 0.02      torchvision and timm Swin, MaxViT
2-D [positions, heads]
``layer_scale``, ``gamma``,      the module's ``init_values`` timm BEiT-style blocks record
``gamma_1``, ``gamma_2``: [C],   if it records one, else      ``init_values``; 1e-6 is
[C, 1, 1] or [1, 1, C], no       1e-6                         torchvision ConvNeXt's
``beta`` beside it                                            ``layer_scale`` and timm
                                                              ConvNeXt's ``ls_init_value``
=============================== ============================ =================================

A layer scale's constructor argument is not kept by torchvision's CNBlock, and the teacher's
trained value is not the initial one, so the rule takes the libraries' ConvNeXt default; a
``gamma`` with a ``beta`` beside it is a normalisation's scale, which no rule guesses.
``nn.MultiheadAttention`` re-draws its own parameters with PyTorch's ``_reset_parameters()``
(Xavier-uniform input projection, zero biases, its ``out_proj`` bias included), after its
``out_proj`` was reset as a Linear: the order of PyTorch's constructor.

A parameter that no rule covers is a TypeError naming it (dotted name and shape) and asking
for a freshly built model as ``student=``. Model-level initialisations that a library applies
after construction (timm's ``init_weights``, torchvision ViT's zeroed head) are not repeated:
layers with ``reset_parameters()`` get PyTorch's defaults, as they always did.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["RULES", "Rule", "find_rule", "reinit_module", "reinit_model", "check_reinit"]

# torchvision's ConvNeXt ``layer_scale`` and timm's ConvNeXt ``ls_init_value`` default.
LAYER_SCALE_INIT = 1e-6


@dataclass(frozen=True)
class Rule:
    """How to draw one kind of bare parameter: ``names`` (the last part of the dotted name),
    ``shape_ok(shape)``, ``init(param, module)`` in place, and a one-line ``what``."""

    names: Tuple[str, ...]
    shape_ok: Callable[[torch.Size], bool]
    init: Callable[[nn.Parameter, nn.Module], None]
    what: str


def _token(shape: torch.Size) -> bool:
    return len(shape) == 3 and shape[0] == 1


def _position(shape: torch.Size) -> bool:
    return len(shape) >= 3 and shape[0] == 1


def _per_channel(shape: torch.Size) -> bool:
    """[C], [C, 1, 1] or [1, 1, C]: one value per channel, broadcast over the rest."""
    return len(shape) >= 1 and sum(size > 1 for size in shape) <= 1 and (
        len(shape) == 1 or shape[0] > 1 or shape[-1] > 1)


def _layer_scale(param: nn.Parameter, module: nn.Module) -> None:
    value = getattr(module, "init_values", None)
    value = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    nn.init.constant_(param, LAYER_SCALE_INIT if value is None else float(value))


RULES: Tuple[Rule, ...] = (
    Rule(("class_token",), _token, lambda p, m: nn.init.zeros_(p),
         "zeros (torchvision's class token)"),
    Rule(("cls_token", "reg_token"), _token, lambda p, m: nn.init.normal_(p, std=1e-6),
         "normal, std 1e-6 (timm's class and register tokens)"),
    Rule(("dist_token",), _token, lambda p, m: nn.init.trunc_normal_(p, std=0.02),
         "truncated normal, std 0.02 (timm DeiT's distillation token)"),
    Rule(("pos_embedding",), _position, lambda p, m: nn.init.normal_(p, std=0.02),
         "normal, std 0.02 (torchvision's position embedding)"),
    Rule(("pos_embed",), _position,
         lambda p, m: nn.init.trunc_normal_(p, std=0.02),
         "truncated normal, std 0.02 (timm's position embedding)"),
    Rule(("relative_position_bias_table",), lambda s: len(s) == 2,
         lambda p, m: nn.init.trunc_normal_(p, std=0.02),
         "truncated normal, std 0.02 (relative position bias tables)"),
    Rule(("layer_scale", "gamma", "gamma_1", "gamma_2"), _per_channel, _layer_scale,
         "the module's init_values, else 1e-6 (layer scales)"),
)


def find_rule(module: nn.Module, name: str, param: nn.Parameter) -> Optional[Rule]:
    """The rule for ``module``'s own parameter ``name`` (no dots), or None if none fits."""
    own = dict(module.named_parameters(recurse=False))
    for rule in RULES:
        if name in rule.names and rule.shape_ok(param.shape):
            if rule.init is _layer_scale and "beta" in own:
                return None  # a normalisation's gamma/beta pair, not a layer scale
            return rule
    return None


def _has_own_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _resets_itself(module: nn.Module) -> bool:
    return callable(getattr(module, "reset_parameters", None)) or isinstance(
        module, nn.MultiheadAttention)


def _without_rule(module: nn.Module) -> Optional[Tuple[str, nn.Parameter]]:
    """The first own parameter of a module without ``reset_parameters()`` that no rule fits."""
    if not _has_own_parameters(module) or _resets_itself(module):
        return None
    for name, param in module.named_parameters(recurse=False):
        if find_rule(module, name, param) is None:
            return name, param
    return None


def _no_rule_error(full: str, param: nn.Parameter, where: str) -> TypeError:
    return TypeError(f"parameter {full!r} {list(param.shape)} of {where} has no "
                     "reset_parameters() and no rule of bdfast.defenses.reinit for its name and "
                     "shape, so it cannot be re-initialised; pass a freshly initialised model of "
                     "the same architecture as student=")


def check_reinit(model: nn.Module) -> None:
    """Raise TypeError naming the first parameter of ``model`` (dotted name and shape) that
    neither its module's ``reset_parameters()`` nor a rule of :data:`RULES` can re-initialise."""
    for prefix, module in model.named_modules():
        missing = _without_rule(module)
        if missing is not None:
            name, param = missing
            where = f"module {prefix!r}" if prefix else "the model itself"
            raise _no_rule_error(f"{prefix}.{name}" if prefix else name, param,
                                 f"{where} ({type(module).__name__})")


def reinit_module(module: nn.Module) -> None:
    """Re-initialise ``module``'s own parameters in place (not its children's, except that
    ``nn.MultiheadAttention`` zeroes its ``out_proj`` bias as its constructor does):
    ``reset_parameters()`` where it has one, else its rule per parameter. A parameter without
    a rule is a TypeError."""
    if callable(getattr(module, "reset_parameters", None)):
        module.reset_parameters()
    elif isinstance(module, nn.MultiheadAttention):
        module._reset_parameters()
    else:
        missing = _without_rule(module)
        if missing is not None:
            raise _no_rule_error(missing[0], missing[1], type(module).__name__)
        for name, param in module.named_parameters(recurse=False):
            find_rule(module, name, param).init(param, module)


def reinit_model(model: nn.Module) -> None:
    """Re-initialise every parameter of ``model`` in place, as a freshly built model.

    First pass, in ``named_modules()`` order: each module with parameters of its own calls
    ``reset_parameters()`` (BatchNorm's also resets its running statistics), and a norm layer
    without affine parameters resets its running statistics; a model whose modules all have
    ``reset_parameters()`` draws exactly what this loop always drew. Second pass, in the same
    order: the modules without it (:func:`reinit_module`'s rules), after their children, as
    their constructors run after their children's. Checks every parameter before drawing any
    (:func:`check_reinit`).
    """
    check_reinit(model)
    bare: List[nn.Module] = []
    for module in model.modules():
        if _has_own_parameters(module):
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
            else:
                bare.append(module)
        elif callable(getattr(module, "reset_running_stats", None)):
            module.reset_running_stats()  # norm layers without affine parameters
    for module in bare:
        reinit_module(module)
