"""The one training loop of the distillation defenses (MEDIC, BCU).

A defense supplies the student, the optimizer and a ``step_fn(net, x, y, epoch) -> loss``; this
module runs epochs x batches around it: mixed precision, the cosine schedule, the progress bar,
``eval_fn`` callbacks, the non-finite-loss stop, DDP, the collapse guard, and the history and
timings it returns. (The lab's supervised trainer, :func:`bdfast.train`, is
:mod:`bdfast.lab.trainer`.)
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bdfast._utils import (check_finite_parameters, check_images, check_not_tensor,
                           check_pixel_range, distributed, eval_mode, iter_batches,
                           progress as _progress)
from bdfast.defenses.checkpoint import (Checkpoint, DataDigest, Interrupted, capture_rng,
                                        generators_of, restore_rng)

StepFn = Callable[[nn.Module, Tensor, Optional[Tensor], int], Tensor]
EvalFn = Callable[[nn.Module, int], Any]
ReplayFn = Callable[[Tensor, Optional[Tensor]], None]
AmpSpec = Union[str, bool, torch.dtype, None]

# How often (in steps) the loop reads the loss back to the host on a GPU: every read is a sync.
_GPU_SYNC_EVERY = 25
_NONE = torch.iinfo(torch.int64).max  # "no bad step yet"
# The collapse guard warns when the trained student matches its reference (the labels, or the
# teacher's predictions) on less than this share of what the teacher matches. In the efficacy
# matrix's 394 MEDIC and BCU runs, the cleaned model kept at least 0.86 of the teacher's test
# accuracy in every run but one, BCU's collapse to one class (0.10 of it); half lies far from
# both (docs/bcu.md, "The collapse guard").
COLLAPSE_SHARE = 0.5


@dataclass
class TrainResult:
    """What :func:`fit` returns besides the trained student.

    ``history``: one dict per epoch (1-based ``epoch``, mean ``loss``, ``lr`` at the epoch's
    start, ``seconds``, ``samples_per_s``, and ``eval`` when ``eval_fn`` ran after it); under
    DDP the loss and throughput are the rank's own.
    ``timings``: seconds spent in ``train`` (the loop), ``eval`` (the callbacks) and
    ``guard`` (the collapse check, with a guard).
    ``agreement_before`` / ``agreement_after``: with a :class:`CollapseGuard`, the share of the
    loader's images on which the teacher / the trained student match the reference (the
    labels, or the teacher's predictions: then ``agreement_before`` is 1.0); ``collapse``: the
    guard's warning when the student ended below :data:`COLLAPSE_SHARE` of the teacher's
    share, else None.
    """

    history: List[Dict[str, Any]] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    agreement_before: Optional[float] = None
    agreement_after: Optional[float] = None
    collapse: Optional[str] = None


@dataclass
class CollapseGuard:
    """What :func:`fit` needs to check the trained student against a collapse.

    ``teacher``: the frozen model the student learnt from (on the training device);
    ``labels``: compare with a batch's labels where it has them (MEDIC), else always with the
    teacher's argmax (BCU, whose labels are ignored); ``defense``: its name, and ``advice``:
    what to try, both for the warning; ``share``: a student below this share of the teacher's
    agreement has collapsed.
    """

    teacher: nn.Module
    labels: bool
    defense: str
    advice: str
    share: float = COLLAPSE_SHARE
    # False: only record the collapse; the defense words the warning itself (BCU's retry).
    warn: bool = True


def resolve_amp(amp: AmpSpec, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``amp``: "auto" is bfloat16 on CUDA and off elsewhere, True is
    bfloat16, False/None is off, or an explicit torch.float16 / torch.bfloat16."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp is True:
        return torch.bfloat16
    if amp is False or amp is None:
        return None
    if amp in (torch.float16, torch.bfloat16):
        return amp
    raise ValueError("amp must be 'auto', True, False, torch.bfloat16 or torch.float16, "
                     f"got {amp!r}")


def check_loader(loader: Iterable, what: str = "loader") -> None:
    """Fail clearly on a bare tensor or a one-shot iterator: training walks the loader once per
    epoch."""
    check_not_tensor(loader, what)
    if not hasattr(loader, "__iter__"):
        raise TypeError(f"{what} must be an iterable of batches (a DataLoader or a list), "
                        f"got {type(loader).__name__}")
    if isinstance(loader, Iterator):  # (without calling iter(): that would start workers)
        raise TypeError(f"{what} must be re-iterable (a DataLoader or a list of batches), not a "
                        "one-shot iterator or generator, because training walks it every epoch")


def check_batch(index: int, x: Tensor) -> None:
    """One-sentence error for batch ``index`` of a loader whose images a model cannot take, or
    that hold 0..255 pixel values instead of images in [0, 1]."""
    what = f"batch {index} of the loader"
    check_images(x, what, any_rank=True, nonempty=True)
    check_pixel_range(x, what)


def fit(student: nn.Module, loader: Iterable, step_fn: StepFn, optimizer: torch.optim.Optimizer,
        *, epochs: int, device: torch.device, schedule: str = "epoch",
        schedule_epochs: Optional[int] = None, amp: AmpSpec = "auto", progress: bool = True,
        eval_fn: Optional[EvalFn] = None, eval_every: int = 1,
        augment: Optional[Callable[[Tensor], Tensor]] = None,
        desc: str = "train", checkpoint: Optional[Checkpoint] = None,
        replay: Optional[ReplayFn] = None,
        guard: Optional[CollapseGuard] = None) -> TrainResult:
    """Train ``student`` (in place, already on ``device``) for ``epochs`` passes over ``loader``.

    Args:
        student: the model being trained; it is put in train mode.
        loader: re-iterable batches ``x`` or ``(x, y)``; ``x`` [B, ...] is moved to ``device``.
        step_fn: ``(net, x, y or None, epoch) -> scalar loss``; runs under autocast. ``net`` is
            the student, or its DDP wrapper when a process group is running: call ``net`` for
            the forward so that DDP synchronises the gradients.
        optimizer: over the student's parameters.
        schedule: cosine annealing from the optimizer's lr to 0, stepped per "epoch" (the lr
            of epoch e is lr * (1 + cos(pi e / E)) / 2) or per "step" (reaching 0 at the end).
        schedule_epochs: the cosine's horizon E in epochs (default ``epochs``); past it the lr
            stays 0, before it the run stops early on the curve.
        amp: see :func:`resolve_amp`; float16 uses a gradient scaler.
        eval_fn: ``eval_fn(student, epoch)`` after every ``eval_every``-th epoch and the last
            one, with the student in eval mode; what it returns is stored in the history.
        augment: applied to every batch ``x`` on ``device`` before ``step_fn`` sees it (see
            :mod:`bdfast.defenses.augment`).
        checkpoint: write a checkpoint after every epoch and, on SIGTERM/SIGINT, after the
            current step (then raise :class:`bdfast.defenses.checkpoint.Interrupted`); with its
            ``resume``, first continue from the newest one (docs/long-runs.md). A resumed
            mid-epoch run draws the epoch's batches again from the RNG states of the epoch's
            start and skips those already trained on, so it ends with the same model.
        replay: ``replay(x, y)`` under autocast, for each batch of the first epoch that a
            resumed run does not train on again (``x`` on ``device``, augmented), so that a
            step can rebuild what it kept from the first epoch (MEDIC's teacher cache).
        guard: after training, one no-grad eval-mode pass of teacher and student over
            ``loader`` (un-augmented) measures how often each matches the reference (see
            :class:`CollapseGuard`); a student below the guard's ``share`` of the teacher's
            share gets one RuntimeWarning naming both and the guard's advice, recorded in the
            result's ``collapse``. The pass draws no random numbers for the run: every RNG
            state, the loader's generators included, is put back, and no weight changes.

    Under DDP (a process group is initialised, e.g. by torchrun) the student is wrapped in
    ``DistributedDataParallel``, which broadcasts rank 0's weights and averages the gradients;
    the loader should give each rank its shard (``DistributedSampler``) with equal batch counts.

    Raises ``FloatingPointError`` naming the epoch and step of the first non-finite loss, or
    the parameter that the last update made non-finite.
    The loss is read back every step on the CPU and every few steps on a GPU (each read waits
    for the device), so on a GPU a few more steps may run before the error.
    """
    if schedule not in ("epoch", "step"):
        raise ValueError(f"schedule must be 'epoch' or 'step', got {schedule!r}")
    amp_dtype = resolve_amp(amp, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    steps_per_epoch = len(loader) if schedule == "step" else 1  # type: ignore[arg-type]
    horizon = epochs if schedule_epochs is None else schedule_epochs
    total_steps = max(1, horizon * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.5 * (1.0 + math.cos(math.pi * min(i, total_steps) / total_steps)))

    result = TrainResult()
    train_s = eval_s = 0.0
    start_epoch = start_step = 0
    resumed: Optional[Dict[str, Any]] = None
    generators = generators_of(loader, augment) if checkpoint is not None else []
    if checkpoint is not None:
        checkpoint.identity.update(
            batches=str(len(loader)) if hasattr(loader, "__len__") else "unknown",  # type: ignore
            world_size=str(dist.get_world_size() if distributed() else 1),
            generators=str(len(generators)))
        resumed = checkpoint.load()
        if resumed is not None:
            student.load_state_dict(resumed["student"])
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
            if scaler is not None:
                scaler.load_state_dict(resumed["scaler"])
            start_epoch, start_step = resumed["epoch"], resumed["step"]
            result.history = resumed["rank"]["history"]
            train_s, eval_s = resumed["rank"]["train_s"], resumed["rank"]["eval_s"]

    net: nn.Module = student
    if distributed():
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(student, device_ids=ids)
    show = progress and (not distributed() or dist.get_rank() == 0)
    sync_every = 1 if device.type == "cpu" else _GPU_SYNC_EVERY

    def to_device(x: Tensor, y: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        return (x.to(device, non_blocking=True),
                None if y is None else y.to(device, non_blocking=True))

    def rebuild(x: Tensor, y: Optional[Tensor]) -> None:
        # A batch of the first epoch that a resumed run does not train on again.
        assert replay is not None
        x, y = to_device(x, y)
        if augment is not None:
            x = augment(x)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            replay(x, y)

    def shared_state() -> Dict[str, Any]:
        return {"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": None if scaler is None else scaler.state_dict()}

    first_rng = None if resumed is None else resumed["rank"]["first_rng"]
    epoch_rng: Dict[str, Any] = {}
    bar = _progress(range(start_epoch, epochs), enabled=show, desc=desc, unit="epoch",
                    initial=start_epoch, total=epochs)
    signals = checkpoint.signals() if checkpoint is not None else contextlib.nullcontext()
    with signals:
        for epoch in bar:
            student.train()
            start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            # First bad step of the epoch, kept on the device so that checking costs no sync.
            first_bad = torch.full((), _NONE, dtype=torch.int64, device=device)
            seen = skip = 0
            batches = iter_batches(loader)
            digest = DataDigest(device) if checkpoint is not None else None
            if checkpoint is not None:
                own = resumed["rank"] if resumed is not None and epoch == start_epoch else None
                if own is not None and replay is not None and epoch > 0:
                    restore_rng(first_rng, generators)  # replays the first epoch's batches
                    for x, y in iter_batches(loader):
                        rebuild(x, y)
                if own is not None:
                    restore_rng(own["epoch_rng"], generators)
                epoch_rng = capture_rng(generators)
                if epoch == 0:
                    first_rng = epoch_rng
                if own is not None and start_step > 0:
                    # Resume mid-epoch: the epoch's batches as the interrupted run drew them,
                    # without the ones it trained on, then the RNGs as they were after them.
                    skip = start_step
                    for x, y in itertools.islice(batches, skip):
                        digest.update(x.to(device))
                        if epoch == 0 and replay is not None:
                            rebuild(x, y)
                    if int(digest.value) != own["digest"]:
                        raise ValueError(f"the loader's first {skip} batches of epoch "
                                         f"{epoch + 1} differ from those the checkpoint in "
                                         f"{checkpoint.folder} saw, so this run cannot resume "
                                         "it; run with the same data, or use another folder")
                    restore_rng(own["rng"], generators)
                    loss_sum.fill_(own["loss_sum"])
                    seen = own["seen"]
            for step, (x, y) in enumerate(batches, start=skip):
                x, y = to_device(x, y)
                if digest is not None:
                    digest.update(x)
                if augment is not None:
                    x = augment(x)
                with torch.autocast(device.type, dtype=amp_dtype,
                                    enabled=amp_dtype is not None):
                    loss = step_fn(net, x, y, epoch)
                loss = loss.float()
                finite = torch.isfinite(loss)
                first_bad = torch.where(~finite & (first_bad == _NONE), step, first_bad)
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                if schedule == "step":
                    scheduler.step()
                loss_sum += loss.detach().double() * len(x)
                seen += len(x)
                if (step + 1) % sync_every == 0:
                    _raise_if_bad(first_bad, epoch)
                if checkpoint is not None and checkpoint.stop_requested(device):
                    _raise_if_bad(first_bad, epoch)
                    elapsed = train_s + time.perf_counter() - start
                    path = checkpoint.save(epoch, step + 1, shared_state(), {
                        "rng": capture_rng(generators), "epoch_rng": epoch_rng,
                        "first_rng": first_rng, "loss_sum": loss_sum.item(), "seen": seen,
                        "digest": int(digest.value), "history": _plain(result.history),
                        "train_s": elapsed, "eval_s": eval_s})
                    raise Interrupted(f"{checkpoint.requested} stopped the run after step "
                                      f"{step + 1} of epoch {epoch + 1}; its checkpoint is "
                                      f"{path}: run again with resume=True (--resume) to "
                                      "continue", path)
            _raise_if_bad(first_bad, epoch)
            if schedule == "epoch":
                scheduler.step()
            seconds = time.perf_counter() - start
            train_s += seconds
            mean_loss = (loss_sum / max(seen, 1)).item()
            record: Dict[str, Any] = {"epoch": epoch + 1, "loss": mean_loss, "lr": lr,
                                      "seconds": seconds,
                                      "samples_per_s": seen / max(seconds, 1e-9)}
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{mean_loss:.4f}",
                                samples_s=f"{record['samples_per_s']:.0f}")
            if eval_fn is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
                start = time.perf_counter()
                student.eval()
                record["eval"] = eval_fn(student, epoch + 1)
                eval_s += time.perf_counter() - start
            result.history.append(record)
            if checkpoint is not None:
                now = capture_rng(generators)  # also the next epoch's starting state
                checkpoint.save(epoch + 1, 0, shared_state(), {
                    "rng": now, "epoch_rng": now, "first_rng": first_rng, "loss_sum": 0.0,
                    "seen": 0, "digest": 0, "history": _plain(result.history),
                    "train_s": train_s, "eval_s": eval_s})
    # The loss is checked before each update, so the last update is checked here.
    check_finite_parameters(student, f"in the last update of epoch {epochs}; the training was "
                            "stopped and the input model is untouched")
    student.eval()
    result.timings.update(train=train_s, eval=eval_s)
    if guard is not None:
        start = time.perf_counter()
        _check_collapse(student, guard, loader, device, amp_dtype, result)
        result.timings["guard"] = time.perf_counter() - start
    return result


@torch.no_grad()
def _check_collapse(student: nn.Module, guard: CollapseGuard, loader: Iterable,
                    device: torch.device, amp_dtype: Optional[torch.dtype],
                    result: TrainResult) -> None:
    """Fill ``result``'s agreements and, for a collapsed student, its ``collapse`` warning."""
    generators = generators_of(loader)
    state = capture_rng(generators)  # a DataLoader's iterator draws its base seed from torch's
    # Teacher hits, student hits, images: summed on the device, read once.
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    labelled = False
    try:
        with eval_mode(student), eval_mode(guard.teacher):
            for x, y in iter_batches(loader):
                x = x.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    t = guard.teacher(x).argmax(1)
                    s = student(x).argmax(1)
                if guard.labels and y is not None:
                    labelled, reference = True, y.to(device, non_blocking=True)
                else:
                    reference = t
                counts += torch.stack([(t == reference).sum(), (s == reference).sum(),
                                       torch.tensor(len(x), device=device)]).double()
    finally:
        restore_rng(state, generators)
    if distributed():
        dist.all_reduce(counts)
    teacher_hits, student_hits, images = counts.tolist()
    result.agreement_before = teacher_hits / images
    result.agreement_after = student_hits / images
    if result.agreement_after >= guard.share * result.agreement_before:
        return
    what = "the labels" if labelled else "the teacher's predictions"
    result.collapse = (f"{guard.defense}: the cleaned model matches {what} on only "
                       f"{result.agreement_after:.3f} of its {int(images)} clean images, against "
                       f"{result.agreement_before:.3f} for the teacher, below {guard.share:.0%} "
                       f"of it, so the training collapsed; try {guard.advice}")
    if guard.warn:
        warn_once(result.collapse, stacklevel=5)


def warn_once(message: str, stacklevel: int = 2) -> None:
    """A RuntimeWarning, from rank 0 only when a process group is running."""
    if not distributed() or dist.get_rank() == 0:
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def _plain(value: Any) -> Any:
    """``value`` with anything but numbers, strings, None, lists and dicts (e.g. what an
    ``eval_fn`` returned) as its ``str``, so that ``torch.load(weights_only=True)`` reads it."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def _raise_if_bad(first_bad: Tensor, epoch: int) -> None:
    """Raise if any step so far had a non-finite loss (on any rank, under DDP)."""
    if distributed():  # every rank must stop at the same check, or the others would hang
        first_bad = first_bad.clone()
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    bad = int(first_bad)
    if bad != _NONE:
        raise FloatingPointError(f"the training loss became non-finite at epoch {epoch + 1}, "
                                 f"step {bad + 1}; the training was stopped and the input model "
                                 "is untouched (try a lower lr, or amp=False)")
