"""MEDIC: remove a backdoor by cloning the model's benign behaviour into a fresh network.

Xu et al., "MEDIC: Remove Model Backdoors via Importance Driven Cloning", CVPR 2023, Algorithm 1.
A re-initialised student learns from a small clean set with cross-entropy plus an
importance-weighted clone loss on every hooked layer (eqs. 1-4), so it copies the neurons that
are strongly activated *and* matter for the clean prediction, and not the backdoor's.

The story of :meth:`Medic.fit`:

1. prepare: deep copies of the teacher (frozen, eval) and of the student; in-place activation
   modules switched off; layers that a functional in-place op still overwrites are found with
   the version counter and handed on as clones (one warning);
   one probe forward on the first batch keeps the selected layers whose forward runs and
   decides each one's feature axis (:func:`bdfast.hooks.feature_axes`: dim 1 of a conv
   output, the last dim of a Linear or LayerNorm output on tokens or a channels-last map);
2. teacher statistics: exact per-feature mean and std of every hooked output over the whole
   loader, merged in float64 (all-reduced under DDP);
3. student: the same architecture with every parameter re-initialised (or ``student=``);
4. train (:mod:`bdfast.defenses.distill`): per step, one teacher forward with the hooked outputs in
   the autograd graph, g = d CE / d outputs by ``torch.autograd.grad`` (no parameter gradients), one
   student forward, loss = CE + lam * ``ops.medic_clone_loss``; Adam with cosine annealing. With the
   teacher cache (:mod:`bdfast.defenses.teacher_cache`, ``cache_teacher``), t, g and the labels are
   computed in the first epoch only and looked up by image content afterwards.

See docs/medic.md for the equations, defaults and deviations from the released code.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdfast import ops
from bdfast.ops import BACKENDS
from bdfast.defenses.augment import AugmentSpec, RandomCrop, resolve_augment
from bdfast._utils import (check_logits, check_number, distributed, eval_mode, iter_batches,
                           model_input_errors, resolve_device, seed_everything)
from bdfast.hooks import (ACTIVATION, ATTENTION, BATCHNORM, NORM, LayerSpec, Tap,
                          copy_without_hooks, disable_inplace, feature_axes,
                          find_inplace_overwrites, select_layers, warn_inplace)
from bdfast.defenses.reinit import reinit_model
from bdfast.defenses.stats import ChannelMoments
from bdfast.defenses.checkpoint import Checkpoint, check_options as check_checkpoint
from bdfast.defenses.distill import (AmpSpec, CollapseGuard, EvalFn, check_batch, check_loader, fit,
                                     resolve_amp)
from bdfast.defenses.teacher_cache import (CacheSpec, TeacherCache, default_budget,
                                           resolve_cache_dtype)

__all__ = ["MedicConfig", "MedicResult", "Medic", "MedicStep", "medic_clone", "teacher_statistics",
           "auto_layers"]

LABEL_MODES = ("auto", "given", "teacher")
# What the collapse guard's warning suggests (bdfast.defenses.distill.CollapseGuard).
MEDIC_ADVICE = "a lower lr (e.g. lr=3e-3) or more epochs"


@dataclass
class MedicConfig:
    """MEDIC's options; the defaults are the paper's (Appendix D) except ``lam`` and ``tau``,
    chosen by the efficacy matrix (paper: 10 and 5; docs/medic.md). See :func:`medic_clone`."""

    epochs: int = 60
    tau: float = 20.0
    lam: float = 3.0
    lr: float = 1e-2
    weight_decay: float = 1e-4
    layers: LayerSpec = "auto"
    signed: bool = False
    reference_compat: bool = False
    amp: AmpSpec = "auto"
    device: Any = None
    seed: Optional[int] = None
    progress: bool = True
    eval_fn: Optional[EvalFn] = None
    labels: str = "auto"
    eval_every: int = 1
    backend: str = "auto"
    augment: AugmentSpec = False
    cache_teacher: CacheSpec = "auto"
    cache_budget: Optional[int] = None
    cache_dtype: Any = "auto"
    channels_last: Union[str, bool] = "auto"
    checkpoint: Optional[str] = None
    resume: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "eval_every"):
            value = getattr(self, name)
            check_number(value, name, integer=True)
        for name in ("tau", "lam", "weight_decay"):
            check_number(getattr(self, name), name, minimum=0)
        check_number(self.lr, "lr")
        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {LABEL_MODES}, got {self.labels!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.eval_fn is not None and not callable(self.eval_fn):
            raise TypeError(f"eval_fn must be callable (model, epoch) -> result, got "
                            f"{type(self.eval_fn).__name__}")
        resolve_amp(self.amp, torch.device("cpu"))  # validates the value
        resolve_augment(self.augment)
        _check_auto_or_bool(self.cache_teacher, "cache_teacher")
        if self.cache_teacher is True and resolve_augment(self.augment) is not None:
            raise ValueError("cache_teacher=True cannot be combined with augment=: the teacher "
                             "sees new images every epoch, so there is nothing to reuse")
        check_number(self.cache_budget, "cache_budget", integer=True, allow_none=True)
        resolve_cache_dtype(self.cache_dtype)
        _check_auto_or_bool(self.channels_last, "channels_last")
        check_checkpoint(self.checkpoint, self.resume)


def _check_auto_or_bool(value: Any, name: str) -> None:
    if not (isinstance(value, str) and value == "auto" or isinstance(value, bool)):
        raise ValueError(f"{name} must be 'auto', True or False, got {value!r}")


@dataclass
class MedicResult:
    """The cleaned ``model`` (eval mode, on the teacher's device), the per-epoch ``history``
    (see :class:`bdfast.defenses.distill.TrainResult`), ``timings`` in seconds (prepare, statistics,
    train, eval, guard, total), the hooked ``layers``, what the teacher ``cache`` did (``used``:
    whether later epochs read it, ``images``, ``bytes_per_image``, ``bytes``, ``hits`` and
    ``reason_off``: why it was off, when it was; empty if ``cache_teacher=False``), whether
    the run trained ``channels_last``, ``layer_preset``: the preset that ``layers="auto"``
    chose (the given preset name otherwise; None for types, names or a predicate), and the
    collapse guard's ``agreement_before`` / ``agreement_after`` (the teacher's and the
    student's accuracy on the loader's labels, or agreement with the teacher's predictions
    where there are none or ``labels="teacher"``) and ``collapse``: its warning, or None
    (:class:`bdfast.defenses.distill.TrainResult`)."""

    model: nn.Module
    history: List[Dict[str, Any]] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    layers: List[str] = field(default_factory=list)
    cache: Dict[str, Any] = field(default_factory=dict)
    channels_last: bool = False
    layer_preset: Optional[str] = None
    agreement_before: Optional[float] = None
    agreement_after: Optional[float] = None
    collapse: Optional[str] = None


class Medic:
    """``Medic(config, **overrides).fit(teacher, loader) -> MedicResult``."""

    def __init__(self, config: Optional[MedicConfig] = None, **overrides: Any):
        self.config = replace(config or MedicConfig(), **overrides)

    def fit(self, teacher: nn.Module, loader: Iterable, *,
            student: Optional[nn.Module] = None) -> MedicResult:
        """Clone ``teacher``'s benign behaviour from ``loader`` into a fresh student.

        ``loader`` yields ``x [B, C, H, W]`` or ``(x, y [B])`` batches (re-iterable: one pass
        for the statistics, then one per epoch). Neither ``teacher`` nor ``student`` is
        modified; the result's model is a trained copy.
        """
        cfg = self.config
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if student is not None and not isinstance(student, nn.Module):
            raise TypeError("student must be a torch.nn.Module or None, got "
                            f"{type(student).__name__}")
        check_loader(loader)
        clock = time.perf_counter()
        home = resolve_device(None, teacher)
        device = resolve_device(cfg.device, teacher)
        seed_everything(cfg.seed)

        # 1. prepare the copies.
        # The user's forward/backward hooks stay on their model: they must not fire here.
        t_model = copy_without_hooks(teacher).to(device).eval().requires_grad_(False)
        disable_inplace(t_model)
        auto = isinstance(cfg.layers, str) and cfg.layers == "auto"
        layers = auto_layers(t_model) if auto else cfg.layers
        names = select_layers(t_model, layers)
        s_model = _student(teacher if student is None else student, names, fresh=student is None)
        s_model.to(device)
        # Read once: each new iteration of a shuffling loader draws a new order.
        x_first, _ = next(iter_batches(loader))
        check_batch(0, x_first)
        x_first = x_first.to(device)
        t_clone, s_clone = _overwritten_layers(t_model, s_model, names, x_first)
        axes = _layer_axes(t_model, names, layers, x_first)
        names = list(axes)
        layout = _memory_format(cfg.channels_last, t_model, s_model, x_first)
        timings = {"prepare": time.perf_counter() - clock}

        # 2. teacher statistics (mu, sigma per hooked channel), validating every batch on the way.
        clock = time.perf_counter()
        mu, sigma = teacher_statistics(t_model, names, loader, device=device, clone=t_clone,
                                       labels=cfg.labels, axes=axes)
        timings["statistics"] = time.perf_counter() - clock

        # 3-4. train the student.
        cache = _teacher_cache(cfg, loader, device)
        step = MedicStep(t_model, s_model, names, mu, sigma, cfg, t_clone=t_clone, s_clone=s_clone,
                         cache=cache, memory_format=layout, axes=axes)
        optimizer = torch.optim.Adam(s_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        checkpoint = Checkpoint.for_run(cfg.checkpoint, cfg.resume, defense="medic",
                                        teacher=t_model, first_batch=x_first,
                                        options={f.name: getattr(cfg, f.name)
                                                 for f in fields(cfg)})
        trained = fit(s_model, loader, step, optimizer, epochs=cfg.epochs, device=device,
                      schedule="step" if hasattr(loader, "__len__") else "epoch",
                      amp=cfg.amp, progress=cfg.progress, eval_fn=cfg.eval_fn,
                      eval_every=cfg.eval_every,
                      augment=RandomCrop.from_spec(cfg.augment, cfg.seed), desc="medic",
                      checkpoint=checkpoint,
                      replay=step.fill_cache if cache is not None else None,
                      guard=CollapseGuard(t_model, labels=cfg.labels != "teacher",
                                          defense="medic", advice=MEDIC_ADVICE))
        timings.update(trained.timings)
        timings["total"] = sum(timings[k] for k in ("prepare", "statistics", "train", "eval",
                                                    "guard"))
        report = cache.summary() if cache is not None else {"used": False, "reason_off": ""}
        s_model.to(home, memory_format=torch.contiguous_format)
        return MedicResult(s_model.eval(), trained.history, timings, names, report,
                           channels_last=layout == torch.channels_last,
                           layer_preset=layers if isinstance(layers, str) else None,
                           agreement_before=trained.agreement_before,
                           agreement_after=trained.agreement_after, collapse=trained.collapse)


class MedicStep:
    """The loss of one MEDIC training step (Algorithm 1, lines 4-7), as a ``distill.fit`` step.

    ``step(net, x, y, epoch) -> loss``: one teacher forward with the hooked outputs t in the
    autograd graph; g = d CE_teacher / d t by ``torch.autograd.grad`` (per-sample: CE summed
    over the batch; no parameter gradients, the teacher's are frozen); one forward of ``net``
    (the student or its DDP wrapper) capturing s; the loss is
    ``CE(student, y) + lam * medic_clone_loss(t, s, g, mu, sigma)`` (eqs. 1-4). y is the
    teacher's argmax when the batch has no labels or ``config.labels == "teacher"``.
    The caller runs backward and the optimizer step.

    4-D batches are brought into ``memory_format``, the models' layout (:func:`_memory_format`).
    ``axes`` maps each hooked name to the dim of its output that holds the features
    (:func:`bdfast.hooks.feature_axes`; 1 where it has no entry): t, s and g reach the loss as
    views with the features moved to dim 1, which the loss reads in place (a token output
    [B, L, C] becomes [B, C, L] with its channels innermost), and the cache keeps them so.
    With a ``cache`` (:class:`bdfast.defenses.teacher_cache.TeacherCache`) the first epoch
    (``epoch`` 0) stores each image's t, g and label, and later epochs look them up instead of
    running the teacher; a miss computes them as without the cache.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, names: Sequence[str],
                 mu: Sequence[Tensor], sigma: Sequence[Tensor], config: MedicConfig, *,
                 t_clone: Iterable[str] = (), s_clone: Iterable[str] = (),
                 cache: Optional[TeacherCache] = None,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 axes: Optional[Mapping[str, int]] = None):
        self.teacher, self.mu, self.sigma, self.config = teacher, list(mu), list(sigma), config
        self.cache, self.memory_format = cache, memory_format
        self.axes = [1 if axes is None else axes.get(name, 1) for name in names]
        # Hooks are on only while a captured forward runs, so eval_fn sees plain models.
        self.t_tap = Tap(teacher, names, clone=t_clone, require_grad=True)
        self.s_tap = Tap(student, names, clone=s_clone)
        self.signed = config.signed or config.reference_compat

    def __call__(self, net: nn.Module, x: Tensor, y: Optional[Tensor], epoch: int) -> Tensor:
        cfg = self.config
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        given = None if y is None or cfg.labels == "teacher" else y  # else the teacher's argmax
        cache = self.cache if self.cache is not None and self.cache.active else None
        found = None
        if cache is not None:
            keys = cache.keys(x, given)
            if epoch > 0:
                cache.finish_filling()
                found = cache.lookup(x, keys)
        if found is not None:
            t, g, y = found
        else:
            t, g, y = self.teacher_outputs(x, given)
            if cache is not None and epoch == 0:
                cache.store(x, keys, y, t, g)
        with self.s_tap:
            logits_s = net(x)
        s = _features_first(self.s_tap.values(), self.axes)
        clone = ops.medic_clone_loss(t, s, g, self.mu, self.sigma,
                                     tau=cfg.tau, signed=self.signed, backend=cfg.backend)
        return F.cross_entropy(logits_s.float(), y) + cfg.lam * clone

    def fill_cache(self, x: Tensor, y: Optional[Tensor]) -> None:
        """Store what the first epoch's step stores in the cache for the batch x [B, ...] (and
        y [B] or None), without the student: a resumed run (``checkpoint=``) rebuilds the
        cache with it."""
        if self.cache is None or not self.cache.active:
            return
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        given = None if y is None or self.config.labels == "teacher" else y
        keys = self.cache.keys(x, given)
        t, g, labels = self.teacher_outputs(x, given)
        self.cache.store(x, keys, labels, t, g)

    def teacher_outputs(self, x: Tensor, y: Optional[Tensor]
                        ) -> Tuple[List[Tensor], List[Tensor], Tensor]:
        """The hooked teacher outputs t, their proxy gradients g (lists of [B, C_l, *spatial],
        the features moved to dim 1) and the labels [B] (``y``, or the teacher's argmax when
        ``y`` is None)."""
        with torch.enable_grad(), self.t_tap:
            logits_t = self.teacher(x)
            t = self.t_tap.values()
            if y is None:
                y = logits_t.argmax(dim=1)
            # Summed CE: each sample's gradient is its own loss's (eq. 3); the released code's
            # batch mean scales g by 1/B and flattens the impact softmax.
            ce_t = F.cross_entropy(logits_t.float(), y,
                                   reduction="mean" if self.config.reference_compat else "sum")
            g = torch.autograd.grad(ce_t, t, allow_unused=True)
        g = [torch.zeros_like(t_l) if g_l is None else g_l for t_l, g_l in zip(t, g)]
        return _features_first(t, self.axes), _features_first(g, self.axes), y


def medic_clone(teacher: nn.Module, loader: Iterable, *, epochs: int = 60, tau: float = 20.0,
                lam: float = 3.0, lr: float = 1e-2, weight_decay: float = 1e-4,
                layers: LayerSpec = "auto", signed: bool = False,
                reference_compat: bool = False, amp: AmpSpec = "auto", device: Any = None,
                seed: Optional[int] = None, progress: bool = True,
                eval_fn: Optional[EvalFn] = None, student: Optional[nn.Module] = None,
                labels: str = "auto", eval_every: int = 1, backend: str = "auto",
                augment: AugmentSpec = False, cache_teacher: CacheSpec = "auto",
                cache_budget: Optional[int] = None, cache_dtype: Any = "auto",
                channels_last: Union[str, bool] = "auto", checkpoint: Optional[str] = None,
                resume: bool = False) -> nn.Module:
    """Remove a backdoor from ``teacher`` by importance-driven cloning (MEDIC, Algorithm 1).

    Args:
        teacher: the suspect classifier, ``x [B, C, H, W] -> logits [B, K]``; never modified.
        loader: a small clean set, re-iterable, yielding ``x`` or ``(x, y [B] int64)``.
        epochs, lr, weight_decay: Adam with cosine annealing to 0 over the run (per step).
        tau: softmax temperature of the importance (eqs. 2-3); lam: weight of the clone loss.
            Defaults 20 and 3, from the efficacy matrix: with the paper's ``tau=5, lam=10`` the
            blended backdoor comes back through the clone term (docs/medic.md).
        layers: which outputs to clone: "auto" (:func:`auto_layers`: "act+linear" on a net
            normalised by GroupNorm or LayerNorm only, else "conv+norm+linear"),
            "conv+norm+linear" (the paper, Appendix D), "conv+bn" (the released code),
            "act+linear", "block+linear" (the residual blocks' outputs,
            :func:`bdfast.hooks.residual_blocks`), "conv+linear", "bn", or module types /
            names / a predicate. The presets' "linear" includes nn.MultiheadAttention's
            output. Selected modules whose forward never runs on the first batch are left
            out (a named one is an error), and each output's features are found on dim 1
            or the last dim (:func:`bdfast.hooks.feature_axes`, docs/medic.md).
        signed: signed z-scores and proxy gradients instead of absolute values.
        reference_compat: the released code's importance: ``signed=True`` and g from the
            batch-mean CE (``layers`` stays as given; add ``layers="conv+bn"`` for its hooks).
        amp: "auto" (bfloat16 autocast on CUDA, off on CPU), True, False or a dtype.
        device: where to train (default: the teacher's); the result returns to the teacher's.
        seed: seeds the re-initialisation and torch's RNG, so a CPU run is reproducible.
        progress: a tqdm bar with epoch, loss and samples/s.
        eval_fn: ``eval_fn(model, epoch)`` every ``eval_every`` epochs (see :class:`Medic` for
            the history it fills).
        student: a freshly initialised model to train instead of the re-initialised copy
            (needed when a parameter has neither its module's ``reset_parameters()`` nor a
            rule of :mod:`bdfast.defenses.reinit`; docs/medic.md, "A fresh student for any net").
        labels: "auto" (the loader's labels, else the teacher's argmax), "given" (labels are
            required) or "teacher" (always the teacher's argmax).
        backend: the ``medic_clone_loss`` backend ("auto", "native", "reference").
        augment: train on augmented batches: True or "crop+flip" (random crop with padding
            and a horizontal flip, as the paper's CIFAR runs), "crop", or False (see
            :mod:`bdfast.defenses.augment`). The teacher's statistics are taken on the images as
            they are.
        cache_teacher: compute the frozen teacher's hooked outputs, proxy gradients and labels
            once per image in the first epoch and look them up by the image's content in the
            later ones (:mod:`bdfast.defenses.teacher_cache`). "auto": on unless ``augment`` is on,
            the run is distributed, or the table would exceed ``cache_budget``; an image the first
            epoch did not see switches it off with one warning and the run continues exactly as
            without it. True: those cases raise ValueError. False: the teacher runs every step.
        cache_budget: the most bytes the cache may hold (default: a quarter of the free memory
            of the training device).
        cache_dtype: the cache's storage dtype: "auto" (float32 rows when the loader's length
            shows the whole table fits ``cache_budget``, so that the run equals the uncached
            one to float rounding; else t in float16 and g in bfloat16; 16-bit outputs are kept
            as they are), or torch.float32, torch.bfloat16, torch.float16 or their names.
        channels_last: run teacher and student with channels-last 4-D weights and batches, the
            layout oneDNN's CPU convolutions are fastest in (a WRN-16-1 step is about a quarter
            faster on 2 cores; docs/medic.md). "auto": on the CPU, when the model has a 2-D
            convolution and its forward works in that layout (a ``.view`` of a feature map may
            not); True: always (an error if the forward fails); False: never. The same math,
            rounded differently. The returned model is in the usual contiguous layout.
        checkpoint: a folder: write a checkpoint there after every epoch and, on SIGTERM or
            SIGINT, after the current step (then raise
            :class:`bdfast.defenses.checkpoint.Interrupted`); the last two are kept
            (docs/long-runs.md).
        resume: continue from the newest readable checkpoint in ``checkpoint`` (start afresh
            if there is none); with the same inputs, on the same device and thread count, the
            result is bit-identical to an uninterrupted run.

    Returns:
        The trained student in eval mode, on the teacher's device. The teacher's forward and
        backward hooks never fire inside the defense, and the student has none of them.
    """
    given = locals()  # the signature is the typed, documented face of MedicConfig's fields
    config = MedicConfig(**{option.name: given[option.name] for option in fields(MedicConfig)})
    return Medic(config).fit(teacher, loader, student=student).model


# Bare parameters that only transformers hold (bdfast.defenses.reinit's token and position rules).
TRANSFORMER_PARAMETERS = ("class_token", "cls_token", "pos_embedding", "pos_embed",
                          "relative_position_bias_table")


def auto_layers(model: nn.Module) -> str:
    """The layer preset that ``layers="auto"`` hooks on ``model``, by how it normalises
    (docs/medic.md, "Nets without BatchNorm"):

    - with a BatchNorm layer, or with no normalisation layer at all: ``"conv+norm+linear"``,
      the paper's choice (Appendix D);
    - normalised only per sample (GroupNorm, LayerNorm or InstanceNorm, no BatchNorm), with
      activation modules (``nn.GELU``, ``nn.ReLU``, ...): ``"act+linear"``, the activations
      and the classifier. Cloning such a net's conv and norm outputs carried the blended
      backdoor into the student on Fashion-MNIST (ASR 0.20-0.38); cloning its activations did
      not, and on the unnormalised net the activations alone cost accuracy;
    - except on a transformer (an ``nn.MultiheadAttention``, or a bare class token, position
      embedding or relative position bias table, :data:`TRANSFORMER_PARAMETERS`):
      ``"conv+norm+linear"``. On the lab's ViT the activations and attention outputs alone
      cost 0.09-0.12 of clean accuracy and let blended through (docs/medic.md,
      "Transformers"); its LayerNorm outputs, the inputs of every attention and MLP, did not.
    """
    modules = list(model.modules())
    normalised = any(isinstance(m, NORM) for m in modules)
    batchnorm = any(isinstance(m, BATCHNORM) for m in modules)
    activations = any(isinstance(m, ACTIVATION) for m in modules)
    transformer = any(isinstance(m, ATTENTION) for m in modules) or any(
        name.rsplit(".", 1)[-1] in TRANSFORMER_PARAMETERS for name, _ in model.named_parameters())
    return "act+linear" if (normalised and not batchnorm and activations and not transformer) \
        else "conv+norm+linear"


@torch.no_grad()
def teacher_statistics(model: nn.Module, names: Sequence[str], loader: Iterable, *,
                       device: torch.device, clone: Iterable[str] = (),
                       labels: str = "auto", axes: Optional[Mapping[str, int]] = None
                       ) -> Tuple[List[Tensor], List[Tensor]]:
    """Exact per-feature mean and (unbiased) std of each hooked output over the whole loader.

    ``model`` runs as it is (the caller puts it in eval mode); the features of each output lie
    on dim ``axes[name]`` (:func:`bdfast.hooks.feature_axes`; dim 1, [B, C, *spatial], for a
    name it lacks or without ``axes``), and each feature is reduced over all samples and other
    positions, merged in float64 and all-reduced over ranks under DDP. Every batch is
    validated on the way (see :func:`_check_labels`). Returns two lists of float32 [C_l]
    tensors (mu, sigma), C_l the layer's feature count.
    """
    moments = [ChannelMoments(1 if axes is None else axes.get(name, 1)) for name in names]
    tap = Tap(model, names, clone=clone, detach=True)
    for index, (x, y) in enumerate(iter_batches(loader)):
        check_batch(index, x)
        x = x.to(device)
        with tap:
            logits = model(x)
        _check_labels(index, x, y, logits, labels)
        for m, value in zip(moments, tap.values()):
            m.update(value)
    mu, sigma = [], []
    for name, m in zip(names, moments):
        m.all_reduce()
        if m.count[0] < 2:
            raise ValueError(f"the loader must yield at least 2 values per channel of layer "
                             f"{name!r} for its statistics, got {int(m.count[0])}")
        if not (torch.isfinite(m.mean).all() and torch.isfinite(m.m2).all()):
            raise FloatingPointError(f"the teacher's activations of layer {name!r} are not finite "
                                     "on the loader's images")
        mu.append(m.mean.float())
        sigma.append(m.std().float())
    return mu, sigma


def _layer_axes(model: nn.Module, names: Sequence[str], layers: LayerSpec,
                x: Tensor) -> Dict[str, int]:
    """``{name: feature axis}`` of the selected layers whose forward runs on the first batch
    ``x`` (:func:`bdfast.hooks.feature_axes`). A preset, types or a predicate may select modules
    that never run (an attention's ``out_proj``), which are left out; a module the user named
    that never runs is a ValueError."""
    named = ([] if isinstance(layers, str) or callable(layers)
             else [spec for spec in layers if isinstance(spec, str)])
    axes = feature_axes(model, names, x, required=named)
    if not axes:
        raise ValueError(f"layers={layers!r} selects no module whose forward runs on the "
                         "loader's images")
    return axes


def _features_first(values: Sequence[Tensor], axes: Sequence[int]) -> List[Tensor]:
    """Each value with its feature axis moved to dim 1: a view, no copy."""
    return [v if axis in (1, 1 - v.dim()) else v.movedim(axis, 1)
            for v, axis in zip(values, axes)]


def _check_labels(index: int, x: Tensor, y: Optional[Tensor], logits: Tensor, labels: str) -> None:
    """One-sentence errors for teacher outputs or labels the training step could not use."""
    where = f"batch {index} of the loader"
    check_logits(logits, len(x), "the teacher")
    if y is None:
        if labels == "given":
            raise ValueError(f"labels='given' but {where} yields images without labels; pass "
                             "(x, y) batches or use labels='teacher'")
        return
    if y.dtype != torch.long or y.shape != x.shape[:1]:
        raise ValueError(f"the labels of {where} must be an int64 tensor [{len(x)}], got shape "
                         f"{list(y.shape)} and dtype {y.dtype}")
    if labels != "teacher" and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise ValueError(f"the labels of {where} must be class indices in [0, {logits.shape[1]}) "
                         f"(the teacher's outputs), got values in [{int(y.min())}, {int(y.max())}]")


def _student(source: nn.Module, names: Sequence[str], *, fresh: bool) -> nn.Module:
    """A trainable deep copy of ``source``: re-initialised when ``fresh`` (Algorithm 1, line 1),
    else the user's ``student=`` as given. In-place activation modules are switched off."""
    model = copy_without_hooks(source)
    if fresh:
        reinit_model(model)  # reset_parameters(), else the rules of defenses.reinit (docs/medic.md)
    else:
        missing = [n for n in names if n not in dict(model.named_modules())]
        if missing:
            raise ValueError("student must have the teacher's hooked layers, but lacks "
                             f"{missing[:5]}")
    disable_inplace(model)
    return model.requires_grad_(True).train()


def _teacher_cache(cfg: MedicConfig, loader: Iterable,
                   device: torch.device) -> Optional[TeacherCache]:
    """The run's teacher cache, or None when ``cache_teacher`` is off or "auto" rules it out."""
    if cfg.cache_teacher is False or resolve_augment(cfg.augment) is not None:
        return None
    if distributed():
        if cfg.cache_teacher is True:
            raise ValueError("cache_teacher=True is not supported under torch.distributed: a "
                             "miss on one rank would have to stop every rank; use 'auto' or False")
        return None
    budget = cfg.cache_budget if cfg.cache_budget is not None else default_budget(device)
    batches = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    return TeacherCache(cfg.cache_teacher, budget=budget,
                        dtype=resolve_cache_dtype(cfg.cache_dtype), batches=batches,
                        rescale=cfg.reference_compat)


# Fewer input channels per group than this make the 1x1 strided case below crash.
_NARROW_CHANNELS = 8


def channels_last_crash_layers(model: nn.Module) -> List[str]:
    """Names of the convolutions whose channels-last CPU backward torch gets wrong.

    torch 2.14.1 (oneDNN's AVX2 kernels; not with ``ONEDNN_MAX_CPU_ISA=AVX``) corrupts memory
    in the channels-last backward of a 1x1 convolution with a stride above 1 and 2 to 7 input
    channels per group: ``double free or corruption``, ``free(): invalid next size`` or a
    segfault within 200 backward passes, and a hang at 2 threads (docs/medic.md). The rule
    takes every such layer (1 input channel too, and on every CPU, since AVX-512 could not be
    checked), so that ``channels_last="auto"`` keeps the contiguous layout on it.
    """
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
            and m.in_channels // m.groups < _NARROW_CHANNELS]


def _memory_format(spec: Union[str, bool], t_model: nn.Module, s_model: nn.Module,
                   x: Tensor) -> torch.memory_format:
    """The layout to train in, with both models converted to it (see ``channels_last``).

    The student's forward is tried on the first batch ``x`` (on the models' device) in
    channels-last (eval mode, no gradient); if it raises, "auto" keeps the contiguous layout and
    True is a ValueError.
    """
    has_conv = any(isinstance(m, nn.Conv2d) for m in s_model.modules())
    if spec is False or (spec == "auto" and (x.device.type != "cpu" or not has_conv)):
        return torch.contiguous_format
    crashing = channels_last_crash_layers(s_model) if x.device.type == "cpu" else []
    if crashing:
        if spec == "auto":
            return torch.contiguous_format
        warnings.warn(f"channels_last=True on a net with a 1x1 strided convolution of fewer than "
                      f"{_NARROW_CHANNELS} input channels per group ({crashing[0]!r}): torch's "
                      "CPU backward of that layer in channels-last has corrupted memory and "
                      "crashed the process (docs/medic.md); channels_last='auto' avoids it",
                      RuntimeWarning, stacklevel=4)
    if x.dim() != 4:
        if spec is True:
            raise ValueError("channels_last=True needs 4-D image batches, got shape "
                             f"{list(x.shape)}")
        return torch.contiguous_format
    s_model.to(memory_format=torch.channels_last)
    try:
        with torch.no_grad(), eval_mode(s_model):
            s_model(x.contiguous(memory_format=torch.channels_last))
    except Exception as error:  # e.g. a .view of a feature map
        s_model.to(memory_format=torch.contiguous_format)
        if spec is True:
            raise ValueError("channels_last=True, but the model's forward fails in the "
                             f"channels-last layout: {str(error).splitlines()[0]}") from error
        return torch.contiguous_format
    t_model.to(memory_format=torch.channels_last)
    return torch.channels_last


def _overwritten_layers(t_model: nn.Module, s_model: nn.Module, names: Sequence[str],
                        x: Tensor) -> Tuple[Set[str], Set[str]]:
    """Hooked layers whose outputs a functional in-place op overwrites, in teacher and student.

    Found with the tensors' version counters on the first batch ``x`` (the student in eval mode,
    so that its BatchNorm statistics do not move); warns once if there are any.
    """
    s_model.eval()
    # The first forward of each model: images it cannot take fail here, in one sentence.
    with model_input_errors(t_model, x):
        t_over = set(find_inplace_overwrites(t_model, names, x))
    with model_input_errors(s_model, x, "the loader's images (as the student)"):
        s_over = set(find_inplace_overwrites(s_model, names, x))
    s_model.train()
    warn_inplace(sorted(t_over | s_over), "medic_clone")
    return t_over, s_over
