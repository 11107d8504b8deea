"""Checkpoint and resume for the training defenses (MEDIC, BCU): docs/long-runs.md.

``checkpoint=DIR`` makes :func:`bdfast.defenses.distill.fit` write, after every epoch and, on
SIGTERM or SIGINT, after the step it is running, everything that decides the rest of the run: the
student, optimizer, scheduler and gradient scaler, every RNG (torch's CPU and CUDA ones, Python's,
NumPy's) and the generators of the loader and the augmentation, the position (epoch, and the batch
within it), the history, and the run's *identity*: a digest of the teacher's weights, of the data
(the first batch, and every batch the epoch has seen so far), the options and the bdfast version.
``resume=True`` continues from the newest readable checkpoint; with the same inputs on the same
device and thread count the result is bit-identical to an uninterrupted run.

Files are ``DIR/ckpt-e<epoch>-s<step>.pt``, written to a temporary file in ``DIR``, flushed to
disk and renamed, so a kill during a write leaves the previous files whole; the last two are
kept. They are read with ``torch.load(weights_only=True)``. Under torch.distributed rank 0
writes (after gathering every rank's RNG states) and every rank reads the same file.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import sys
import threading
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from bdfast._version import __version__
from bdfast._utils import distributed
from bdfast.defenses.teacher_cache import fingerprint_weights, fingerprints

__all__ = ["Checkpoint", "Interrupted", "EXIT_INTERRUPTED", "KEEP"]

# The exit code of `bdfast clean` stopped by SIGTERM/SIGINT after writing a checkpoint: BSD's
# EX_TEMPFAIL, "try again later", which is what a preempted job should do (with --resume).
EXIT_INTERRUPTED = 75
_MIX = 0x100000001B3  # an odd multiplier (FNV's prime): the digest depends on the batches' order
KEEP = 2  # checkpoints kept in the folder: the newest, and one to fall back to
FORMAT = 1
_NAME = re.compile(r"^ckpt-e(\d{6})-s(\d{9})\.pt$")
_STALE = re.compile(r"^\.ckpt-e\d{6}-s\d{9}\.pt\.\d+\.tmp$")
# Changing these does not change the trained model, so a resumed run may change them.
_FREE_OPTIONS = ("progress", "eval_fn", "eval_every", "device", "checkpoint", "resume")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped a run with ``checkpoint=`` after a whole step; ``path`` is the
    checkpoint written then. A KeyboardInterrupt, so it unwinds like Ctrl-C; the CLI exits with
    :data:`EXIT_INTERRUPTED`."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


def tensor_digest(tensors: Iterable[Tuple[str, Tensor]]) -> str:
    """A hex digest of named tensors' names, dtypes, shapes and values (logical order, so the
    memory layout and the device do not matter)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def batch_digest(x: Tensor) -> Tensor:
    """An exact int64 scalar (on ``x``'s device, no sync) of the images x [B, ...]: the wrapping
    sum of their :func:`bdfast.defenses.teacher_cache.fingerprints`."""
    return fingerprints(x)[0].sum()


class DataDigest:
    """An exact, order-sensitive int64 digest of the batches an epoch has seen, kept on their
    device so that updating it costs no sync: ``value = value * M + sum_b key(x_b)`` (wrapping),
    with ``key`` the first of :func:`bdfast.defenses.teacher_cache.fingerprints`."""

    def __init__(self, device: torch.device):
        self.value = torch.zeros((), dtype=torch.int64, device=device)
        self._weights: Dict[int, Tuple[Tensor, Tensor]] = {}

    def update(self, x: Tensor) -> None:
        """Fold in the batch x [B, ...] (on the digest's device)."""
        size = x[0].numel()
        if size not in self._weights:  # drawn once: they come from a generator of their own
            self._weights[size] = fingerprint_weights(size, x.device)
        self.value = self.value * _MIX + fingerprints(x, weights=self._weights[size])[0].sum()


def describe_options(options: Mapping[str, Any]) -> Dict[str, str]:
    """The options that decide the trained model, as strings: a callable by its qualified name
    (its repr would hold a memory address), anything else by its repr."""
    described = {}
    for name, value in sorted(options.items()):
        if name in _FREE_OPTIONS:
            continue
        if callable(value) and not isinstance(value, (type, nn.Module)):
            value = f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', value)}"
        described[name] = value if isinstance(value, str) else repr(value)
    return described


# ----------------------------------------------------------------------------- RNG states

def generators_of(*objects: Any) -> List[torch.Generator]:
    """The torch.Generator objects that draw a run's randomness outside the global RNGs: a
    DataLoader's own, its (batch) sampler's and the inner sampler's, and the augmentation's."""
    found: List[torch.Generator] = []

    def visit(obj: Any, depth: int) -> None:
        if obj is None or depth > 3:
            return
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not other for other in found):
            found.append(g)
        for name in ("sampler", "batch_sampler"):
            visit(getattr(obj, name, None), depth + 1)

    for obj in objects:
        visit(obj, 0)
    return found


def capture_rng(generators: List[torch.Generator]) -> Dict[str, Any]:
    """Every RNG state of this process, in types that ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "generators": [g.get_state() for g in generators]}


def restore_rng(state: Mapping[str, Any], generators: List[torch.Generator]) -> None:
    """Put back the RNG states of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    for g, saved in zip(generators, state["generators"]):
        g.set_state(saved)


# ----------------------------------------------------------------------------- the folder

class Checkpoint:
    """The checkpoint folder of one training run, and its identity.

    ``identity`` maps what makes two runs the same ("teacher", "data", "options", ...) to
    strings or string dicts; :meth:`load` refuses a checkpoint whose identity differs, in one
    sentence naming what differs. ``resume=False`` refuses a folder that already holds
    checkpoints (so that no run is overwritten); ``resume=True`` on a folder without one starts
    afresh, so that a job restarted by torchrun or a scheduler can always pass it.
    """

    def __init__(self, folder: str, *, resume: bool, identity: Mapping[str, Any]):
        check_options(folder, resume)
        self.folder, self.resume = os.fspath(folder), resume
        self.identity: Dict[str, Any] = {"bdfast": __version__, **identity}
        self.requested: Optional[str] = None  # the name of the signal that asked to stop
        os.makedirs(self.folder, exist_ok=True)

    @classmethod
    def for_run(cls, folder: Optional[str], resume: bool, *, defense: str, teacher: nn.Module,
                first_batch: Tensor, options: Mapping[str, Any]) -> Optional["Checkpoint"]:
        """The checkpoint of a defense run, or None without ``folder``. ``first_batch``
        [B, ...] is the first batch the defense read from its loader."""
        if folder is None:
            check_options(folder, resume)
            return None
        data = [f"{int(batch_digest(first_batch)) & (2**64 - 1):016x}"]
        if distributed():  # each rank reads its own shard: the identity holds every rank's
            ours, data = data[0], [""] * dist.get_world_size()
            dist.all_gather_object(data, ours)
        return cls(folder, resume=resume, identity={
            "defense": defense,
            "teacher": tensor_digest(teacher.state_dict().items()),
            "data": ",".join(data),
            "options": describe_options(options)})

    def files(self) -> List[str]:
        """The checkpoint files in the folder, oldest first."""
        return _files(self.folder)

    # --------------------------------------------------------------------- reading

    def load(self) -> Optional[Dict[str, Any]]:
        """The newest readable checkpoint's state, this rank's own entries under ``"rank"``, or
        None when there is none (or ``resume`` is False). An unreadable newest file is skipped
        with one line on stderr; a checkpoint of another run raises ValueError."""
        if not self.resume:
            return None
        if distributed():  # rank 0 chooses, so that every rank reads the same file
            chosen = [self._newest_readable()[0] if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(chosen, src=0)
            name = chosen[0]
            state = None if name is None else _read(os.path.join(self.folder, name))
        else:
            name, state = self._newest_readable()
        if state is None:
            return None
        self._check_identity(state["identity"], name)
        rank = dist.get_rank() if distributed() else 0
        state["rank"] = state.pop("ranks")[rank]
        return state

    def _newest_readable(self) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
        for name in reversed(self.files()):
            path = os.path.join(self.folder, name)
            try:
                return name, _read(path)
            except Exception as error:  # truncated, corrupt, or not ours: try the previous one
                reason = " ".join(str(error).split())[:160] or type(error).__name__
                print(f"bdfast: checkpoint {path} is unreadable ({reason}); falling back to the "
                      "previous one", file=sys.stderr)
        return None, None

    def _check_identity(self, saved: Mapping[str, Any], name: str) -> None:
        where = os.path.join(self.folder, name)
        for key, ours in self.identity.items():
            theirs = saved.get(key)
            if theirs == ours:
                continue
            if key == "options" and isinstance(theirs, dict):
                diff = [f"{k}={theirs.get(k, 'unset')} there, {ours.get(k, 'unset')} here"
                        for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
                what = "other options (" + "; ".join(diff) + ")"
            else:
                what = {"teacher": "another teacher (its weights differ)",
                        "data": "other data (the first batch differs)",
                        "bdfast": f"bdfast {theirs}, and this is bdfast {ours}",
                        "defense": f"the defense {theirs}, not {ours}",
                        "batches": f"{theirs} batches per epoch, not {ours}",
                        "world_size": f"{theirs} processes, not {ours}",
                        "generators": f"{theirs} loader/augmentation generators, not {ours}",
                        }.get(key, f"{key} {theirs}, not {ours}")
            raise ValueError(f"the checkpoint {where} was written with {what}, so this run "
                             "cannot resume it; run with the same inputs, or use another folder")

    # --------------------------------------------------------------------- writing

    def save(self, epoch: int, step: int, shared: Dict[str, Any], own: Dict[str, Any]) -> str:
        """Write the checkpoint of position (``epoch``, ``step``): the next batch to train is
        batch ``step`` of epoch ``epoch`` (0-based). ``shared`` is the same on every rank
        (model, optimizer, ...); ``own`` is this rank's (RNG states, its loss so far), gathered
        to rank 0 under torch.distributed. Returns the file's path; every rank returns after
        rank 0 has written it."""
        ranks = [own]
        if distributed():
            ranks = [None] * dist.get_world_size()  # type: ignore[list-item]
            dist.all_gather_object(ranks, own)
        name = f"ckpt-e{epoch:06d}-s{step:09d}.pt"
        path = os.path.join(self.folder, name)
        if not distributed() or dist.get_rank() == 0:
            payload = {"format": FORMAT, "identity": self.identity, "epoch": epoch,
                       "step": step, "ranks": ranks, **shared}
            write_atomically(payload, path)
            for old in self.files()[:-KEEP]:
                os.remove(os.path.join(self.folder, old))
            for stale in os.listdir(self.folder):  # left by a run killed while writing
                if _STALE.match(stale) and not stale.endswith(f".{os.getpid()}.tmp"):
                    os.remove(os.path.join(self.folder, stale))
        if distributed():
            dist.barrier()  # no rank goes on (or resumes) before the file is whole
        return path

    # --------------------------------------------------------------------- signals

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """Within the block SIGTERM and SIGINT only set :attr:`requested` (a second one
        interrupts at once); the previous handlers come back afterwards. Handlers can only be
        set in the main thread; elsewhere nothing changes."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(signum: int, frame: Any) -> None:
            if self.requested is not None:
                raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
            self.requested = signal.Signals(signum).name

        previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def stop_requested(self, device: torch.device) -> bool:
        """Whether a signal asked to stop, on any rank (under torch.distributed every rank
        must stop after the same step, or the others would wait in the next collective)."""
        if not distributed():
            return self.requested is not None
        flag = torch.tensor(int(self.requested is not None), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.requested is None:
            self.requested = "a signal on another rank"
        return bool(flag.item())


def check_options(folder: Optional[str], resume: bool) -> None:
    """One-sentence errors for ``checkpoint=``/``resume=`` values a run cannot use, before the
    run spends any time: the defenses call it first."""
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}")
    if folder is None:
        if resume:
            raise ValueError("resume=True needs checkpoint=, the folder to resume from")
        return
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a folder path, got {type(folder).__name__}")
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"checkpoint={folder!r} is a file, not a folder")
    if not resume and os.path.isdir(folder) and _files(folder):
        raise ValueError(f"the folder {folder} already holds checkpoints of a run; pass "
                         "resume=True (--resume) to continue it, or give an empty folder")


def _files(folder: str) -> List[str]:
    return sorted(name for name in os.listdir(folder) if _NAME.match(name))


def write_atomically(payload: Any, path: str) -> None:
    """``torch.save(payload)`` to ``path`` so that ``path`` holds the old file or the whole new
    one: a temporary file in the same folder, flushed to disk (fsync), renamed over ``path``;
    the folder is synced too, so that the rename survives a power cut. An error or an interrupt
    (Ctrl-C, or SIGTERM where the CLI turns it into KeyboardInterrupt) removes the temporary
    file; it is created with ``open``, so its mode follows the umask. ``bdfast clean`` writes
    its output file this way too."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read(path: str) -> Dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError("not a bdfast checkpoint of this format")
    return state
