"""The machinery DDE and MBNS share: find the BatchNorm layers, reduce their inputs over a loader,
prune channels and report (docs/pruning.md).

Both defenses score every BN channel from the BN's *input* (the conv output before
normalisation), flag per-layer outliers with ``ops.layer_outliers`` and prune a channel by
setting its BN weight (gamma) to 0, as the released code does; ``zero_bias=True`` also zeroes
beta. The statistics pass runs a working model in eval mode under ``no_grad``; unless
``inplace=True`` that model is a deep copy, so the user's model is never touched.
"""
from __future__ import annotations

import abc
import inspect
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from bdfast import ops
from bdfast._utils import (check_images, check_not_tensor, check_number, check_pixel_range,
                           eval_mode, iter_batches, model_input_errors, progress as _progress,
                           resolve_device)
from bdfast.hooks import BATCHNORM, CONV, NORM, copy_without_hooks, hooks_set_aside

__all__ = ["PruneResult", "ChannelStatistic", "prune_outliers", "apply_preset", "AUTO_U_GRID",
           "DEFAULT_ACC_BUDGET", "PRESETS"]

# The thresholds u="auto" tries, from the most conservative down to one standard deviation; the
# paper's u = 3 is among them.
AUTO_U_GRID = (5.0, 4.5, 4.0, 3.5, 3.0, 2.75, 2.5, 2.25, 2.0, 1.75, 1.5, 1.25, 1.0)
# The clean accuracy (a fraction) that u="auto" may give up on its held-out images.
DEFAULT_ACC_BUDGET = 0.02
# The presets that run DDE and MBNS as another code base does (docs/pruning.md, "BackdoorBench
# preset"). BackdoorBench's defense/ep.py and defense/bnp.py score every BatchNorm2d, and no other
# BN class, on the first batch of their loader only.
PRESETS = ("backdoorbench",)
PRESET_LAYERS = (nn.BatchNorm2d,)
PRESET_BATCHES = 1


@dataclass
class PruneResult:
    """What :func:`bdfast.dde_prune` and :func:`bdfast.mbns_prune` return.

    Attributes:
        model: the pruned model (a deep copy of the input unless ``inplace=True``), with every
            module's train/eval flag as in the input. The input's forward and backward hooks
            never fire during the statistics pass; a copy has none of them, while with
            ``inplace=True`` the model keeps its own.
        report: a JSON-friendly dict::

            method        "dde" or "mbns"
            score         "entropy" (DDE, low is suspicious) or "kl" (MBNS, high is suspicious)
            options       the options the call ran with (u, step, ..., preset), the values a
                          preset sets included
            u             the threshold multiplier used: ``options["u"]``, or the one that
                          ``u="auto"`` chose (None when it pruned nothing)
            sweep         with ``u="auto"``: one dict per u tried, most conservative first:
                          u, pruned (channels), val_acc, drop (from the unpruned model's val_acc);
                          else None
            samples       how many images the statistics were computed from
            layers        one dict per BN layer in registration order: name, conv (the conv
                          whose output the BN normalises, found from a forward pass; None if the
                          BN input is not a conv output), channels, scores [channels] (NaN for a
                          constant neuron), threshold (NaN when the layer has < 2 finite
                          scores), pruned (channel indices)
            num_layers, num_channels, num_pruned    totals
            seconds       wall time of the whole call
    """

    model: nn.Module
    report: Dict[str, Any]


def check_options(u: Union[float, str], zero_bias: bool, inplace: bool,
                  acc_budget: float = DEFAULT_ACC_BUDGET) -> None:
    """The options both defenses share; one sentence naming the bad one."""
    if u != "auto":
        check_number(u, "u", note=" (the threshold is u standard deviations from the layer "
                                  "mean; or 'auto')")
    check_number(acc_budget, "acc_budget", minimum=0, note=" (a fraction of clean accuracy)")
    if not acc_budget < 1:
        raise ValueError(f"acc_budget must be a fraction of clean accuracy below 1, got "
                         f"{acc_budget!r}")
    for name, value in (("zero_bias", zero_bias), ("inplace", inplace)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")


def apply_preset(preset: Optional[str], function: Callable[..., Any], options: Dict[str, Any],
                 settings: Dict[str, Tuple[Any, str]]) -> Dict[str, Any]:
    """``options`` (the checked options of a call of ``function``) with ``preset``'s settings in
    place, and ``preset`` recorded; unchanged apart from ``preset`` when it is None.

    ``settings`` maps an option to the preset's value and why the preset has it. An option left
    at ``function``'s default (or given the preset's value) takes the preset's value; any other
    value contradicts the preset and is a ValueError, as is ``u="auto"``: the presets reproduce
    code that prunes at one fixed u.
    """
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        raise ValueError(f"unknown preset {preset!r}; the only one is 'backdoorbench' (or None "
                         "for bdfast's own defaults)")
    resolved = dict(options, preset=preset)
    if preset is None:
        return resolved
    if options.get("u") == "auto":
        raise ValueError(f"preset={preset!r} prunes at one fixed u, as BackdoorBench does, so "
                         "u='auto' contradicts it; give u a number or drop the preset")
    defaults = inspect.signature(function).parameters
    for name, (value, why) in settings.items():
        given = options[name]
        if given != defaults[name].default and given != value:
            raise ValueError(f"preset={preset!r} sets {name}={value!r} ({why}), so "
                             f"{name}={given!r} contradicts it; leave {name} out or drop the "
                             "preset")
        resolved[name] = value
    return resolved


def batchnorm_layers(model: nn.Module, *, method: str, running_stats: bool = False,
                     kinds: Tuple[type, ...] = BATCHNORM) -> List[str]:
    """The names of the model's BN layers of the classes ``kinds``, once the model is checked to
    be prunable by ``method``; reads no data.

    Every such module counts, shortcut BNs included; each must be affine (a gamma to zero) and,
    with ``running_stats``, track running statistics (MBNS compares against them).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    others = _listed(type(m).__name__ for m in model.modules() if isinstance(m, BATCHNORM))
    if not names and others:
        raise ValueError(f"{method} scores only {_listed(k.__name__ for k in kinds)} layers, and "
                         f"the model's BatchNorm layers are {others}")
    if not names:
        raise ValueError(f"{method} scores and prunes BatchNorm channels, but the model has no "
                         f"BatchNorm layer{_other_norms(model)}; use bdfast.medic_clone (MEDIC) "
                         "or bdfast.bcu_cleanse (BCU) instead, which need no BatchNorm")
    modules = dict(model.named_modules())
    for name in names:
        bn = modules[name]
        if bn.weight is None:
            raise ValueError(f"BatchNorm layer {name!r} has affine=False, so it has no weight "
                             f"(gamma) for {method} to zero")
        if running_stats and bn.running_mean is None:
            raise ValueError(f"BatchNorm layer {name!r} has track_running_stats=False; {method} "
                             "compares clean statistics with the running statistics")
        # Broken running statistics would show up only downstream (NaN inputs of the next
        # layers) or not at all (an infinite mean gives an infinite KL that no rule flags).
        if bn.running_mean is not None and not (
                bool(torch.isfinite(bn.running_mean).all())
                and bool(torch.isfinite(bn.running_var).all())
                and bool((bn.running_var >= 0).all())):
            raise ValueError(f"BatchNorm layer {name!r} has broken running statistics (a "
                             "running_mean that is not finite, or a running_var that is negative "
                             f"or not finite), so {method} cannot use the model; nothing was "
                             "pruned")
    return names


def _other_norms(model: nn.Module) -> str:
    """`` (it normalises with GroupNorm and LayerNorm)``: the classes of the model's non-BN norm
    layers, for the no-BatchNorm error; empty when it has none."""
    listed = _listed(type(m).__name__ for m in model.modules() if isinstance(m, NORM))
    return f" (it normalises with {listed})" if listed else ""


def _listed(words: Iterable[str]) -> str:
    """``"GroupNorm, LayerNorm and InstanceNorm2d"``: the distinct ``words`` in first-seen
    order, for error messages; empty for none."""
    distinct = list(dict.fromkeys(words))
    if len(distinct) < 2:
        return "".join(distinct)
    return f"{', '.join(distinct[:-1])} and {distinct[-1]}"


def working_model(model: nn.Module, *, inplace: bool,
                  device: Any) -> Tuple[nn.Module, torch.device]:
    """The model to prune (the input, or a deep copy without its hooks) on the device."""
    device = resolve_device(device, model)
    # A copy does not take the user's hooks along: they must not fire in the statistics pass.
    work = model if inplace else copy_without_hooks(model)
    return work.to(device), device


def bn_input_pass(model: nn.Module, names: Sequence[str], loader: Iterable,
                  reduce: Callable[[int, Tensor], None], *, device: torch.device,
                  progress: bool, desc: str, max_samples: Optional[int] = None,
                  max_batches: Optional[int] = None) -> Tuple[int, List[Optional[str]]]:
    """Run ``model`` over ``loader`` and hand each BN layer's input to ``reduce(i, x)``.

    ``x`` is the input [B, C, *spatial] of BN layer ``names[i]`` for one batch, seen by a
    forward pre-hook: reducing it right there keeps memory at O(B * channels) and makes later
    in-place ops of the model harmless. One forward pass per batch, in eval mode (the mode of
    every module is restored afterwards) and under ``no_grad``. ``max_samples`` stops after that
    many images (the last batch is cut), ``max_batches`` after that many batches.

    Returns the number of images seen and, per BN layer, the name of the conv that feeds it
    (see :func:`conv_feeding`).
    """
    check_not_tensor(loader)
    modules = dict(model.named_modules())
    ran = [False] * len(names)

    def hook_for(i: int):
        def hook(module, args):
            if ran[i]:
                raise RuntimeError(f"BatchNorm layer {names[i]!r} ran twice in one forward pass; "
                                   "its two inputs would need two different statistics")
            ran[i] = True
            reduce(i, args[0].detach())
        return hook

    total = len(loader) if hasattr(loader, "__len__") else None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    handles: list = []
    seen, batches, convs = 0, 0, None
    try:
        # With inplace=True this is the user's model: its own hooks must not fire here.
        with torch.no_grad(), eval_mode(model), hooks_set_aside(model):
            for x, _ in _progress(iter_batches(loader), enabled=progress, desc=desc,
                                  unit="batch", total=total):
                check_images(x, "a batch of the loader", any_rank=True)
                check_pixel_range(x, "a batch of the loader")
                if max_samples is not None:
                    x = x[:max_samples - seen]
                x = x.to(device, non_blocking=True)
                if convs is None:
                    with model_input_errors(model, x):
                        convs = conv_feeding(model, names, x[:1])
                    handles = [modules[n].register_forward_pre_hook(hook_for(i))
                               for i, n in enumerate(names)]
                ran[:] = [False] * len(names)
                model(x)
                missing = [n for n, r in zip(names, ran) if not r]
                if missing:
                    raise RuntimeError(f"BatchNorm layers {missing} did not run in the forward "
                                       "pass, so they cannot be scored")
                seen, batches = seen + len(x), batches + 1
                if ((max_samples is not None and seen >= max_samples)
                        or (max_batches is not None and batches >= max_batches)):
                    break
    finally:
        for handle in handles:
            handle.remove()
    return seen, convs


def conv_feeding(model: nn.Module, names: Sequence[str], x: Tensor) -> List[Optional[str]]:
    """For each BN layer, the conv whose output tensor is exactly the BN's input, else None.

    Found from one forward pass on ``x`` (forward order and tensor identity, not module names),
    so it holds for shortcut convs and models that apply their layers functionally; a BN that
    normalises something else (a pre-activation BN, a sum) gets None.
    """
    modules = dict(model.named_modules())
    outputs: List[Tuple[Tensor, str]] = []  # references keep the tensors' identities unique
    feeding: Dict[str, Optional[str]] = {}

    def record_conv(name: str):
        return lambda module, args, out: outputs.append((out, name))

    def record_bn(name: str):
        def hook(module, args):
            feeding[name] = next((c for out, c in reversed(outputs) if out is args[0]), None)
        return hook

    handles = [m.register_forward_hook(record_conv(n)) for n, m in modules.items()
               if isinstance(m, CONV)]
    handles += [modules[n].register_forward_pre_hook(record_bn(n)) for n in names]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [feeding.get(n) for n in names]


def layer_offsets(model: nn.Module, names: Sequence[str], device: torch.device) -> Tensor:
    """[L+1] int64 boundaries of each BN layer's channels in the packed [K] score vector."""
    modules = dict(model.named_modules())
    sizes = [modules[n].num_features for n in names]
    return torch.tensor([0] + sizes, dtype=torch.int64, device=device).cumsum(0)


def check_finite(finite: Tensor, offsets: Tensor, names: Sequence[str]) -> None:
    """Stop before pruning if a BN layer's inputs were NaN or infinite (docs/pruning.md, "Errors").

    ``finite`` is bool [K] over the packed channels of the layers delimited by ``offsets``.
    """
    if bool(finite.all()):
        return
    bounds = offsets.tolist()
    bad = [n for i, n in enumerate(names) if not bool(finite[bounds[i]:bounds[i + 1]].all())]
    raise FloatingPointError(f"the inputs of BatchNorm layers {bad} were not finite on the "
                             "loader's images; the model or the data is broken, nothing was pruned")


def validation_batches(loader: Iterable, what: str) -> List[Tuple[Tensor, Optional[Tensor]]]:
    """The batches ``(x, y or None)`` of a clean validation loader, read once and kept."""
    check_not_tensor(loader, what)
    batches = []
    for x, y in iter_batches(loader, what):
        check_images(x, f"a batch of {what}", any_rank=True)
        check_pixel_range(x, f"a batch of {what}")
        batches.append((x, y))
    return batches


class HeldOutHalves:
    """A loader's batches cut in two: iterating yields the first half of each batch (the
    statistics) and keeps the second half in ``held`` (the images u="auto" validates on), so
    the two never share an image. A batch of one image goes to the statistics."""

    def __init__(self, loader: Iterable):
        check_not_tensor(loader)
        self.loader = loader
        self.held: List[Tuple[Tensor, Optional[Tensor]]] = []

    def __iter__(self):
        self.held = []
        for x, y in iter_batches(self.loader):
            cut = len(x) - len(x) // 2
            if cut < len(x):
                self.held.append((x[cut:], None if y is None else y[cut:]))
            yield x[:cut] if y is None else (x[:cut], y[:cut])


def choose_u(model: nn.Module, names: Sequence[str], offsets: Tensor, scores: Tensor, *,
             direction: str, zero_bias: bool, batches: Sequence[Tuple[Tensor, Optional[Tensor]]],
             acc_budget: float, device: torch.device
             ) -> Tuple[Optional[float], List[Dict[str, Any]], Tensor, Tensor]:
    """``u="auto"``: the most aggressive u of :data:`AUTO_U_GRID` whose pruning keeps the clean
    accuracy on ``batches`` within ``acc_budget`` of the unpruned model's.

    ``batches`` are held-out clean images, never the statistics' own and never triggered ones;
    where they carry no labels, accuracy is agreement with the unpruned model's predictions.
    The grid is walked from the most conservative u down, since a smaller u prunes a superset of
    channels; the walk stops at the first u over budget. Returns the chosen u (None when even
    the first is over budget: nothing is pruned), the sweep, one dict per u tried, and the
    chosen u's mask, bool [K] on the scores' device, and per-layer thresholds, float64 [L] (all
    NaN when no u was chosen). The model's BN parameters are restored before returning.
    """
    if not batches:
        raise ValueError("u='auto' found no held-out clean images to validate on; give "
                         "val_loader= or batches of at least 2 images")
    modules = dict(model.named_modules())
    bns = [modules[n] for n in names]
    saved = [(bn.weight.detach().clone(), None if bn.bias is None else bn.bias.detach().clone())
             for bn in bns]
    bounds = offsets.tolist()

    def predict() -> List[Tensor]:
        return [model(x.to(device, non_blocking=True)).argmax(dim=1).cpu() for x, _ in batches]

    def accuracy(predictions: List[Tensor], labels: List[Tensor]) -> float:
        correct = sum(int((p == t).sum()) for p, t in zip(predictions, labels))
        return correct / sum(len(t) for t in labels)

    def restore() -> None:
        for bn, (weight, bias) in zip(bns, saved):
            bn.weight.copy_(weight)
            if bias is not None:
                bn.bias.copy_(bias)

    sweep: List[Dict[str, Any]] = []
    chosen: Optional[float] = None
    chosen_mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    chosen_thresholds = torch.full((len(names),), math.nan, dtype=torch.float64)
    with torch.no_grad(), eval_mode(model), hooks_set_aside(model):
        unpruned = predict()
        labels = [p if y is None else y.cpu() for p, (_, y) in zip(unpruned, batches)]
        base = accuracy(unpruned, labels)
        try:
            for u in AUTO_U_GRID:
                mask, thresholds = ops.layer_outliers(scores, offsets, u=u, direction=direction,
                                                      return_thresholds=True)
                on_host = mask.cpu()
                for i, bn in enumerate(bns):
                    zero_channels(bn, torch.nonzero(on_host[bounds[i]:bounds[i + 1]]).flatten(),
                                  zero_bias)
                acc = accuracy(predict(), labels)
                restore()
                sweep.append({"u": u, "pruned": int(mask.sum()), "val_acc": acc,
                              "drop": base - acc})
                # Accuracies are ratios of counts: without the tolerance, a drop of exactly the
                # budget (5 of 250 images for 0.02) would count as over it.
                if base - acc > acc_budget + 1e-9:
                    break
                chosen, chosen_mask, chosen_thresholds = u, mask, thresholds
        finally:
            restore()  # also after an error: with inplace=True this is the user's model
    return chosen, sweep, chosen_mask, chosen_thresholds


def outlier_mask(model: nn.Module, names: Sequence[str], offsets: Tensor, scores: Tensor, *,
                 u: Union[float, str], direction: str, zero_bias: bool,
                 val_batches: Optional[Sequence[Tuple[Tensor, Optional[Tensor]]]],
                 acc_budget: float, device: torch.device
                 ) -> Tuple[Optional[float], Optional[List[Dict[str, Any]]], Tensor, Tensor]:
    """The channels to prune, bool [K]: ``ops.layer_outliers`` at ``u``, or at the u that
    :func:`choose_u` picks on ``val_batches`` when ``u="auto"``. Returns ``(u used, sweep or
    None, mask, per-layer thresholds [L])``; the thresholds are NaN where u="auto" chose none."""
    if u == "auto":
        return choose_u(model, names, offsets, scores, direction=direction, zero_bias=zero_bias,
                        batches=val_batches or [], acc_budget=acc_budget, device=device)
    mask, thresholds = ops.layer_outliers(scores, offsets, u=u, direction=direction,
                                          return_thresholds=True)
    return float(u), None, mask, thresholds


def zero_channels(bn: nn.Module, channels: Tensor, zero_bias: bool) -> None:
    """Prune ``channels`` (int64 indices) of one BN layer: gamma := 0, and beta with
    ``zero_bias``. In place, under the caller's ``no_grad``."""
    bn.weight[channels.to(bn.weight.device)] = 0
    if zero_bias and bn.bias is not None:
        bn.bias[channels.to(bn.bias.device)] = 0


def prune(model: nn.Module, names: Sequence[str], convs: Sequence[Optional[str]],
          offsets: Tensor, scores: Tensor, mask: Tensor, thresholds: Tensor, *,
          zero_bias: bool) -> List[Dict[str, Any]]:
    """Zero gamma (and beta with ``zero_bias``) of the flagged channels; return the layer reports.

    ``scores`` and ``mask`` are packed [K] over the layers delimited by ``offsets`` [L+1], and
    ``thresholds`` [L] are the layers' thresholds as :func:`outlier_mask` returns them.
    """
    modules = dict(model.named_modules())
    bounds = offsets.tolist()
    scores, mask, thresholds = scores.double().cpu(), mask.cpu(), thresholds.cpu()
    layers = []
    with torch.no_grad():
        for i, (name, conv) in enumerate(zip(names, convs)):
            lo, hi = bounds[i], bounds[i + 1]
            pruned = torch.nonzero(mask[lo:hi]).flatten()
            zero_channels(modules[name], pruned, zero_bias)
            layers.append({"name": name, "conv": conv, "channels": hi - lo,
                           "scores": scores[lo:hi].tolist(), "threshold": float(thresholds[i]),
                           "pruned": pruned.tolist()})
    return layers


def report(method: str, score: str, options: Dict[str, Any], samples: int,
           layers: List[Dict[str, Any]], start: float, u: Optional[float],
           sweep: Optional[List[Dict[str, Any]]]) -> Dict[str, Any]:
    """The report dict described in :class:`PruneResult`."""
    return {"method": method, "score": score, "options": options, "u": u, "sweep": sweep,
            "samples": samples, "layers": layers, "num_layers": len(layers),
            "num_channels": sum(layer["channels"] for layer in layers),
            "num_pruned": sum(len(layer["pruned"]) for layer in layers),
            "seconds": time.perf_counter() - start}


class ChannelStatistic(abc.ABC):
    """The plug-in of one pruning method (docs/pruning.md): what it reduces from each BN layer's
    input, and how it turns that into one score per channel. :func:`prune_outliers` calls
    :meth:`start`, :meth:`update` for every batch and BN layer, :meth:`finish`, then
    :meth:`score`."""

    method: str      # "dde" or "mbns": the report's method and the progress bar's name
    score_name: str  # what the scores are: "entropy", "kl"
    direction: str   # which tail is suspicious: "low" or "high"
    running_stats: bool = False  # whether the BN layers must track running statistics

    @abc.abstractmethod
    def start(self, model: nn.Module, names: Sequence[str]) -> None:
        """Once, before the pass: the working model and its BN layers' names."""

    @abc.abstractmethod
    def update(self, layer: int, x: Tensor) -> None:
        """Reduce one batch's input x [B, C, *spatial] of BN layer ``names[layer]``."""

    @abc.abstractmethod
    def finish(self, seen: int, device: torch.device) -> Tuple[Tensor, int]:
        """After the pass over ``seen`` images: merge across ranks; return whether each
        channel's reduced values are finite, bool [K], and how many images they cover."""

    @abc.abstractmethod
    def score(self, offsets: Tensor) -> Tensor:
        """The scores [K] of the channels of the layers delimited by ``offsets`` [L+1]."""


def prune_outliers(model: nn.Module, loader: Iterable, statistic: ChannelStatistic, *,
                   u: Union[float, str], val_loader: Optional[Iterable], acc_budget: float,
                   zero_bias: bool, inplace: bool, device: Any, progress: bool,
                   options: Dict[str, Any], max_samples: Optional[int] = None) -> PruneResult:
    """The story DDE and MBNS share: check the model's BN layers -> BN inputs -> per-channel
    statistic -> score -> per-layer outliers (``u``, or ``u="auto"`` on ``val_loader``'s
    batches) -> prune -> report.

    ``loader`` may be a :class:`HeldOutHalves`, whose held-out halves then validate
    ``u="auto"``. ``options`` are the call's options, for the report; with
    ``options["preset"]`` set, only the :data:`PRESET_LAYERS` are scored, on the loader's first
    :data:`PRESET_BATCHES` batches.
    """
    start = time.perf_counter()
    preset = options.get("preset")
    method = f"{statistic.method}_prune" + (f" with preset={preset!r}" if preset else "")
    # The model is checked before either loader is read: a model the method cannot prune (no
    # BatchNorm) fails at once, not after a pass over the data.
    names = batchnorm_layers(model, method=method, running_stats=statistic.running_stats,
                             kinds=PRESET_LAYERS if preset else BATCHNORM)
    val_batches = None if val_loader is None else validation_batches(val_loader, "val_loader")
    work, device = working_model(model, inplace=inplace, device=device)
    statistic.start(work, names)
    seen, convs = bn_input_pass(work, names, loader, statistic.update, device=device,
                                progress=progress, desc=f"{statistic.method} statistics",
                                max_samples=max_samples,
                                max_batches=PRESET_BATCHES if preset else None)
    finite, samples = statistic.finish(seen, device)
    offsets = layer_offsets(work, names, device)
    check_finite(finite, offsets, names)
    scores = statistic.score(offsets)
    if isinstance(loader, HeldOutHalves):
        val_batches = loader.held
    chosen, sweep, mask, thresholds = outlier_mask(work, names, offsets, scores, u=u,
                                                   direction=statistic.direction,
                                                   zero_bias=zero_bias, val_batches=val_batches,
                                                   acc_budget=acc_budget, device=device)
    layers = prune(work, names, convs, offsets, scores, mask, thresholds, zero_bias=zero_bias)
    return PruneResult(work, report(statistic.method, statistic.score_name, options, samples,
                                    layers, start, chosen, sweep))
