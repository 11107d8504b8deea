"""BCU: backdoor cleansing with unlabeled data (Pang et al., CVPRW 2023).

The student is the teacher with a share of the weights of every conv and linear layer replaced
by fresh random values, more in deeper layers ("adaptive layer-wise initialisation", eq. 3);
it then learns the teacher's temperature-softened predictions on unlabeled images (eq. 2).

The story of :func:`bcu_cleanse`:

1. ratios: each conv/linear/attention layer's re-initialisation ratio, from the layers' forward
   order (:func:`bcu_ratios`);
2. student: a deep copy of the teacher, each weight/bias element replaced with probability p
   by a freshly initialised copy's value (:func:`partial_reinit`); norm layers and other bare
   parameters (tokens, position embeddings, layer scales) untouched;
3. train (:mod:`bdfast.defenses.distill`): KL(softmax(t/T) || softmax(s/T)) with T rising per epoch,
   SGD with momentum and a per-epoch cosine schedule; labels ignored.

See docs/bcu.md.
"""
from __future__ import annotations

import copy
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdfast._utils import (check_logits, check_number, eval_mode, iter_batches,
                           model_input_errors, resolve_device, seed_everything)
from bdfast.defenses.augment import AugmentSpec, RandomCrop, resolve_augment
from bdfast.hooks import CONV, LINEAR, copy_without_hooks, residual_blocks
from bdfast.defenses.reinit import reinit_module
from bdfast.defenses.checkpoint import Checkpoint, check_options as check_checkpoint
from bdfast.defenses.distill import (AmpSpec, CollapseGuard, EvalFn, TrainResult, check_batch,
                                     check_loader, fit, resolve_amp, warn_once)

__all__ = ["bcu_cleanse", "bcu_fit", "BcuResult", "bcu_ratios", "partial_reinit",
           "ADAPTIVE_RATIOS"]

# The paper's ratios (Sec. 4): first conv, the four depth groups, the final classifier.
ADAPTIVE_RATIOS = {"first": 0.01, "groups": (0.01, 0.03, 0.09, 0.27), "classifier": 0.10}

RatioSpec = Union[str, Mapping[str, float]]

# The layers BCU re-initialises: convs, linears, and nn.MultiheadAttention, whose input
# projection is a linear layer's weight held as a parameter of the attention itself.
LAYERS = CONV + LINEAR + (nn.MultiheadAttention,)
# What the collapse guard's warning suggests (docs/bcu.md, "Nets without BatchNorm").
BCU_ADVICE = "a lower lr (e.g. lr=0.01), init='reset' or more epochs"
# The collapse guard's share for BCU. BCU distils the teacher's predictions on the very images
# the guard reads, so a student that learnt matches nearly all of them: 0.92-1.00 in the lab's
# runs (docs/bcu.md, "The collapse guard"). Half of them, the labelled defenses' share, let a
# run at 0.537 through (plain_cnn, digits, badnets, seed 1, AVX-512: ACC 0.982 -> 0.522).
COLLAPSE_AGREEMENT = 0.75
# A collapsed run is trained once more from the same student at this share of its lr: 0.01,
# the paper's, for the default 0.05. The collapse is the first steps' (docs/bcu.md, "The
# collapse guard"); on the run that collapsed, lr 0.01 kept ACC 0.973 with ASR 0.012.
RETRY_LR_SHARE = 0.2


def bcu_cleanse(teacher: nn.Module, loader: Iterable, *, epochs: int = 100,
                ratios: RatioSpec = "adaptive", ratio_scale: float = 2.0,
                temperature: Optional[float] = None, lr: float = 0.05, momentum: float = 0.9,
                weight_decay: float = 5e-4,
                init: str = "kaiming", schedule_epochs: Optional[int] = None,
                augment: AugmentSpec = False, amp: AmpSpec = "auto", device: Any = None,
                seed: Optional[int] = None, progress: bool = True,
                eval_fn: Optional[EvalFn] = None, checkpoint: Optional[str] = None,
                resume: bool = False) -> nn.Module:
    """Remove a backdoor from ``teacher`` by partial re-initialisation and distillation (BCU).

    Args:
        teacher: the suspect classifier, ``x [B, C, H, W] -> logits [B, K]``; never modified.
        loader: re-iterable batches ``x`` or ``(x, y)`` of unlabeled images (labels are
            ignored; out-of-distribution images work too).
        epochs: training epochs (paper: 100).
        ratios: "adaptive" (the paper's depth-dependent ratios, see :func:`bcu_ratios`),
            "uniform:<p>", or a ``{module-name-prefix: p}`` mapping (longest prefix wins;
            unmatched layers keep all their weights).
        ratio_scale: multiplies every layer's ratio (capped at 1). The default 2, twice the
            paper's share of every layer, is the efficacy matrix's choice; ``ratio_scale=1``
            gives the paper's ratios (docs/bcu.md has both, with numbers).
        temperature: a fixed KD temperature; by default T_e = 1 + 3 (e + 1) / E in epoch
            e = 0..E-1 (the released code).
        lr, momentum, weight_decay: SGD, with cosine annealing per epoch. ``lr`` 0.05 and
            ``init="kaiming"`` are the efficacy matrix's choice; the paper's are ``lr=0.01,
            init="reset"`` (docs/bcu.md has both, with numbers).
        init: where the replacement values come from: "kaiming" (Kaiming-normal with fan_out
            for conv weights, as the constructors of the released code's models do; larger
            values in deep layers) or "reset" (each layer's own ``reset_parameters()``,
            PyTorch's default init). See docs/bcu.md.
        schedule_epochs: the cosine schedule's horizon in epochs (default ``epochs``: the lr
            reaches 0 at the end); the released code fixes it at 100 whatever ``epochs`` is.
        augment: train on augmented batches: True or "crop+flip" (random crop with padding
            and a horizontal flip, the paper's recipe), "crop", or False (see
            :mod:`bdfast.defenses.augment`). The ratios come from the first batch as it is.
        amp: "auto" (bfloat16 autocast on CUDA, off on CPU), True, False or a dtype.
        device: where to train (default: the teacher's); the result returns to the teacher's.
        seed: seeds the masks, the fresh weights and torch's RNG (a CPU run is reproducible).
        progress: a tqdm bar with epoch, loss and samples/s.
        eval_fn: ``eval_fn(model, epoch)`` after every epoch (student in eval mode).
        checkpoint, resume: a folder to write checkpoints to, and whether to continue from the
            newest one there; as for :func:`bdfast.medic_clone` (docs/long-runs.md).

    Returns:
        The student in eval mode, on the teacher's device. The teacher's forward and backward
        hooks never fire inside the defense, and the student has none of them. A student that
        agrees with the teacher on fewer than :data:`COLLAPSE_AGREEMENT` of the loader's images
        has collapsed (the collapse guard, :class:`bdfast.defenses.distill.CollapseGuard`): it
        is trained once more from the same start at :data:`RETRY_LR_SHARE` of ``lr``, with one
        RuntimeWarning that tells both runs; :func:`bcu_fit` returns the same run with what it
        measured.
    """
    given = locals()
    return _bcu(**given).model


def bcu_fit(teacher: nn.Module, loader: Iterable, **options: Any) -> "BcuResult":
    """:func:`bcu_cleanse` with its options, returning the run's :class:`BcuResult`."""
    defaults = {name: p.default for name, p in inspect.signature(bcu_cleanse).parameters.items()
                if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"bcu_fit got unknown options {unknown}; it takes {sorted(defaults)}")
    return _bcu(teacher, loader, **{**defaults, **options})


@dataclass
class BcuResult:
    """What :func:`bcu_fit` returns: the cleaned ``model`` (eval mode, on the teacher's device),
    the per-epoch ``history`` and the ``timings`` of :class:`bdfast.defenses.distill.TrainResult`,
    each layer's re-initialisation ``ratios`` (``ratio_scale`` applied), and the collapse guard's
    ``agreement_before`` (1.0) and ``agreement_after`` (the share of the loader's images on which
    the student's argmax is the teacher's) and ``collapse``: its warning, or None. When the
    first training collapsed and was run again at ``RETRY_LR_SHARE`` of its lr, ``retried_lr``
    is that lr, ``first_collapse`` the first run's guard message, and the rest describes the
    second run."""

    model: nn.Module
    history: List[Dict[str, Any]] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    ratios: Dict[str, float] = field(default_factory=dict)
    agreement_before: Optional[float] = None
    agreement_after: Optional[float] = None
    collapse: Optional[str] = None
    retried_lr: Optional[float] = None
    first_collapse: Optional[str] = None


def _bcu(teacher: nn.Module, loader: Iterable, *, epochs: int, ratios: RatioSpec,
         ratio_scale: float, temperature: Optional[float], lr: float, momentum: float,
         weight_decay: float, init: str, schedule_epochs: Optional[int], augment: AugmentSpec,
         amp: AmpSpec, device: Any, seed: Optional[int], progress: bool,
         eval_fn: Optional[EvalFn], checkpoint: Optional[str], resume: bool) -> BcuResult:
    """The run of :func:`bcu_cleanse`, every option given."""
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    _check_options(epochs, temperature, lr, momentum, weight_decay, eval_fn)
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"init must be one of {sorted(INITS)}, got {init!r}")
    check_number(schedule_epochs, "schedule_epochs", integer=True, allow_none=True)
    check_number(ratio_scale, "ratio_scale", minimum=0)
    resolve_augment(augment)
    resolve_amp(amp, torch.device("cpu"))  # validates the value
    check_checkpoint(checkpoint, resume)
    options = {k: v for k, v in locals().items() if k not in ("teacher", "loader")}
    check_loader(loader)
    home = resolve_device(None, teacher)
    device = resolve_device(device, teacher)
    seed_everything(seed)

    # 1. ratios from the forward order of the first batch.
    # The user's forward/backward hooks stay on their model: they must not fire here.
    t_model = copy_without_hooks(teacher).to(device).eval().requires_grad_(False)
    x, _ = next(iter_batches(loader))
    check_batch(0, x)
    x = x.to(device)
    with torch.no_grad(), model_input_errors(t_model, x):
        check_logits(t_model(x), len(x), "the teacher")
    layer_ratios = {name: min(1.0, p * ratio_scale)
                    for name, p in bcu_ratios(t_model, x, ratios).items()}

    # 2. the partially re-initialised student.
    student = copy.deepcopy(t_model).requires_grad_(True)
    partial_reinit(student, layer_ratios, init=init)

    # 3. distillation.
    def step(net: nn.Module, x: Tensor, y: Optional[Tensor], epoch: int) -> Tensor:
        temp = temperature if temperature is not None else 1.0 + 3.0 * (epoch + 1) / epochs
        with torch.no_grad():
            logits_t = t_model(x)
        logits_s = net(x)
        # KL(p_t || p_s) averaged over the batch, without the usual T^2 factor (eq. 2).
        return F.kl_div(F.log_softmax(logits_s.float() / temp, dim=1),
                        F.log_softmax(logits_t.float() / temp, dim=1),
                        reduction="batchmean", log_target=True)

    def train(rate: float, folder: Optional[str]) -> TrainResult:
        optimizer = torch.optim.SGD(student.parameters(), lr=rate, momentum=momentum,
                                    weight_decay=weight_decay)
        saver = Checkpoint.for_run(folder, resume, defense="bcu", teacher=t_model,
                                   first_batch=x, options={**options, "lr": rate})
        return fit(student, loader, step, optimizer, epochs=epochs, device=device,
                   schedule="epoch", schedule_epochs=schedule_epochs,
                   augment=RandomCrop.from_spec(augment, seed), amp=amp, progress=progress,
                   eval_fn=eval_fn, desc="bcu", checkpoint=saver,
                   guard=CollapseGuard(t_model, labels=False, defense="bcu", advice=BCU_ADVICE,
                                       share=COLLAPSE_AGREEMENT, warn=False))

    # Kept off the device: it is only read again if the first training collapses.
    start = {name: value.detach().to("cpu", copy=True)
             for name, value in student.state_dict().items()}
    trained = train(lr, checkpoint)
    first_collapse, retried_lr = trained.collapse, None
    if first_collapse is not None:
        # A collapse comes from the first steps (one class after epoch 1 on the lab's
        # plain_cnn), so the same start at a smaller step is worth its second run; the
        # retry's checkpoints live beside the first run's, so both resume.
        retried_lr = lr * RETRY_LR_SHARE
        student.load_state_dict(start)
        first = trained
        trained = train(retried_lr,
                        None if checkpoint is None else os.path.join(checkpoint, "retry"))
        warn_once(_retry_message(first, trained, lr, retried_lr), stacklevel=4)
    return BcuResult(student.eval().to(home), trained.history, trained.timings, layer_ratios,
                     trained.agreement_before, trained.agreement_after, trained.collapse,
                     retried_lr, first_collapse)


def _retry_message(first: TrainResult, retry: TrainResult, lr: float, retried_lr: float) -> str:
    """The one warning of a run whose ``first`` training collapsed (``retry``: the second)."""
    told = (f"bcu: the training at lr={lr:g} collapsed (the student matched the teacher's "
            f"predictions on {first.agreement_after:.3f} of the clean images, below "
            f"{COLLAPSE_AGREEMENT:.0%}), so it was run again from the same re-initialised "
            f"student at lr={retried_lr:g}")
    if retry.collapse is None:
        return (f"{told}, which matches them on {retry.agreement_after:.3f}; the returned "
                f"model is that run's (BcuResult.retried_lr)")
    return f"{told}, which collapsed too: {retry.collapse}"


def bcu_ratios(model: nn.Module, x: Tensor, ratios: RatioSpec = "adaptive") -> Dict[str, float]:
    """The re-initialisation ratio of every conv, linear and ``nn.MultiheadAttention`` layer of
    ``model`` (:data:`LAYERS`), by name.

    ``x`` [B, C, H, W] is an example batch on the model's device; one no-grad, eval-mode forward
    with hooks gives the order in which the layers first run and the resolution of their
    outputs (a conv's spatial dims, the dims between batch and features of a linear's or an
    attention's output: tokens [B, L, C] or a channels-last map [B, H, W, C]; the model's modes
    are restored; nothing else changes). A layer whose weights its parent applies itself (the
    ``out_proj`` of an nn.MultiheadAttention, torchvision Swin's ``qkv`` and ``proj``) takes
    the place and resolution of the closest enclosing module that runs.

    "adaptive" (the paper): the first layer to run gets 0.01 and the last one (the classifier)
    0.10. The layers in between are cut into *stages*, the runs of consecutive layers with the
    same output resolution (a ResNet's or a ConvNeXt's stages: downsampling changes the
    resolution, and a 1x1 shortcut conv has its stage's resolution); a layer inside a residual
    block (:func:`bdfast.hooks.residual_blocks`, the outermost one) counts with the resolution
    of the block's last layer, so that a squeeze-excitation's 1x1 convs or a window
    attention's projections stay in their block's stage. Where all of them share one
    resolution (a ViT), the stages are the residual blocks the layers belong to instead.
    Stage s of S goes to depth group ``floor(4 (s + 1/2) / S)`` with ratio 0.01, 0.03, 0.09 or
    0.27: four stages get one group each (the CIFAR ResNet-18 mapping of the paper), fewer
    stages are spread over the groups by their centre (2 stages: 0.03, 0.27; 3 stages: 0.01,
    0.09, 0.27), more stages share groups in order (a 12-block ViT: three blocks per group).
    Layers that take no part in the forward pass get 0.

    "uniform:<p>" gives every layer p; a ``{prefix: p}`` mapping gives each layer the p of the
    longest prefix that names it or one of its parents ("" matches all), else 0.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LAYERS)}
    if not layers:
        raise ValueError("the model has no Conv, Linear or MultiheadAttention layer to "
                         "re-initialise")
    if isinstance(ratios, str) and ratios.startswith("uniform:"):
        p = _ratio(ratios[len("uniform:"):], "ratios='uniform:<p>'")
        return {name: p for name in layers}
    if isinstance(ratios, Mapping):
        return _prefix_ratios(layers, ratios)
    if ratios != "adaptive":
        raise ValueError(f"ratios must be 'adaptive', 'uniform:<p>' or a {{module-name-prefix: p}} "
                         f"mapping, got {ratios!r}")

    order = _forward_order(model, layers, x)
    result = {name: 0.0 for name in layers}
    result[order[0][0]] = ADAPTIVE_RATIOS["first"]
    result[order[-1][0]] = ADAPTIVE_RATIOS["classifier"]
    middle = order[1:-1]
    blocks = residual_blocks(model)
    outer = {name: min((b for b in blocks if _under(name, b)), key=len, default=name)
             for name, _ in middle}
    # A block's layers take the resolution of its last layer, the block's output: a squeeze-
    # excitation's 1x1 convs or a window attention's [windows, tokens, C] stay in their stage.
    block_resolution = {outer[name]: resolution for name, resolution in middle}
    keys: List[Any] = [block_resolution[outer[name]] for name, _ in middle]
    if len(set(keys)) == 1:
        keys = [outer[name] for name, _ in middle]  # one resolution throughout (a ViT)
    stages: List[List[str]] = []
    previous = None
    for (name, _), key in zip(middle, keys):
        if key != previous:
            stages.append([])
            previous = key
        stages[-1].append(name)
    groups = ADAPTIVE_RATIOS["groups"]
    for s, stage in enumerate(stages):
        p = groups[math.floor(len(groups) * (s + 0.5) / len(stages))]
        result.update({name: p for name in stage})
    return result


def _kaiming_fan_out(module: nn.Module) -> None:
    reinit_module(module)
    if isinstance(module, CONV):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


# How a fresh copy of a layer draws the replacement values (``init=`` of bcu_cleanse).
INITS: Dict[str, Callable[[nn.Module], None]] = {
    "reset": reinit_module,
    "kaiming": _kaiming_fan_out,
}


@torch.no_grad()
def partial_reinit(model: nn.Module, ratios: Mapping[str, float],
                   init: str = "reset") -> Dict[str, float]:
    """Replace each weight/bias element of the named layers, with probability ``ratios[name]``,
    by the value of a freshly initialised copy of the layer (eq. 3; no rescaling). In place.
    ``init`` names how the copy is initialised (see :data:`INITS`; both start from
    :func:`bdfast.defenses.reinit.reinit_module`: ``reset_parameters()``, or PyTorch's own
    initialisation of an nn.MultiheadAttention's input projection). Only the layer's own
    parameters change.

    Masks and fresh values come from torch's global CPU RNG (seed it for reproducibility), so
    that a seed gives the same student on any device. Returns the share of
    elements actually replaced per layer.
    """
    modules = dict(model.named_modules())
    replaced: Dict[str, float] = {}
    for name, p in ratios.items():
        module = modules[name]
        if p == 0:
            replaced[name] = 0.0
            continue
        fresh = copy.deepcopy(module).cpu()
        INITS[init](fresh)
        count = total = 0
        for (_, param), (_, new) in zip(module.named_parameters(recurse=False),
                                        fresh.named_parameters(recurse=False)):
            mask = (torch.rand(param.shape) < p).to(param.device)
            param.copy_(torch.where(mask, new.to(param.device, param.dtype), param))
            count += int(mask.sum())
            total += mask.numel()
        replaced[name] = count / max(total, 1)
    return replaced


def _forward_order(model: nn.Module, layers: Mapping[str, nn.Module],
                   x: Tensor) -> List[Tuple[str, Tuple[int, ...]]]:
    """``(name, output resolution)`` of the layers in the order they first run on ``x``; a
    layer that does not run itself takes the place and resolution of its closest enclosing
    module that does (whose forward applies its weights), and is left out if none does."""
    finished: Dict[str, Tuple[int, Tuple[int, ...]]] = {}  # name -> (rank, resolution)

    def hook(name: str):
        def record(module, inputs, output):
            if isinstance(output, (tuple, list)) and output:
                output = output[0]  # nn.MultiheadAttention: (attention output, weights)
            if name not in finished and isinstance(output, Tensor):
                finished[name] = (len(finished), _resolution(module, output))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()]
    try:
        with torch.no_grad(), eval_mode(model):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    placed = []
    for index, name in enumerate(layers):
        runs = next((finished[a] for a in _enclosing(name) if a in finished), None)
        if runs is not None:
            placed.append((runs[0], index, name, runs[1]))
    if not placed:
        raise ValueError("no Conv, Linear or MultiheadAttention layer ran in the model's "
                         "forward pass")
    return [(name, resolution) for _, _, name, resolution in sorted(placed)]


def _enclosing(name: str) -> List[str]:
    """``name`` and the names of the modules around it, innermost first, the model itself left
    out (its forward runs whatever happens)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _resolution(module: nn.Module, output: Tensor) -> Tuple[int, ...]:
    """The dims of ``output`` that are neither batch nor features."""
    if isinstance(module, CONV):
        return tuple(output.shape[2:])
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        return tuple(output.shape[:-2])  # [L, B, E]
    return tuple(output.shape[1:-1])


def _prefix_ratios(layers: Mapping[str, nn.Module],
                   ratios: Mapping[str, float]) -> Dict[str, float]:
    checked = {}
    for prefix, p in ratios.items():
        if not isinstance(prefix, str):
            raise TypeError(f"ratios keys must be module-name prefixes (str), got {prefix!r}")
        if not any(_under(name, prefix) for name in layers):
            raise ValueError(f"ratios prefix {prefix!r} names no Conv, Linear or "
                             "MultiheadAttention layer of the model")
        checked[prefix] = _ratio(p, f"ratios[{prefix!r}]")
    result = {}
    for name in layers:
        matches = [prefix for prefix in checked if _under(name, prefix)]
        result[name] = checked[max(matches, key=len)] if matches else 0.0
    return result


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _ratio(value: Any, what: str) -> float:
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}") from None
    if isinstance(value, bool) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}")
    return p


def _check_options(epochs, temperature, lr, momentum, weight_decay, eval_fn) -> None:
    check_number(epochs, "epochs", integer=True)
    check_number(temperature, "temperature", allow_none=True)
    check_number(lr, "lr")
    for name, value in (("momentum", momentum), ("weight_decay", weight_decay)):
        check_number(value, name, minimum=0)
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"eval_fn must be callable (model, epoch) -> result, got "
                        f"{type(eval_fn).__name__}")
