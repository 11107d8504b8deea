"""The emulated CUDA device of the tests: bdfast's CUDA kernels run on the CPU.

``make cuda-emu`` builds ``libbdfast_cuda_emu.so`` from csrc/cuda (host code and kernels) and the
CPU execution layer in tests/support/cuda_emu (see tests/support/cuda_emu/runtime.h for its
execution model). The library registers the bdfast operators again as ``torch.ops.bdfast_emu.*``,
taking CPU tensors. While :func:`active` is entered, every call of a ``torch.ops.bdfast`` operator
on the calling thread goes there instead of to the CPU kernels, so the public wrappers (input
checks, backend choice, autograd) run unchanged on top of the CUDA kernels.

``BDFAST_CUDA_EMU_LIBRARY`` names another build of the library (the sanitizer builds of
``make sanitize-cuda``); ``BDFAST_CUDA_EMU_WORKERS`` sets how many blocks run at once (default 3)
and ``BDFAST_CUDA_EMU_SEED`` fixes the block order and fiber schedules (default: new ones for
every launch).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBRARY = os.environ.get("BDFAST_CUDA_EMU_LIBRARY",
                         os.path.join(ROOT, "build", "cuda-emu", "libbdfast_cuda_emu.so"))

_loaded = False


def load() -> None:
    """Loads the emulation library once; fails with the command that builds it."""
    global _loaded
    if _loaded:
        return
    if not os.path.exists(LIBRARY):
        raise RuntimeError(f"the emulated CUDA kernels are not built ({LIBRARY} is missing); "
                           "run `make cuda-emu` (make test does)")
    torch.ops.load_library(LIBRARY)
    torch.ops.bdfast_emu.configure(int(os.environ.get("BDFAST_CUDA_EMU_WORKERS", "3")),
                                   int(os.environ.get("BDFAST_CUDA_EMU_SEED", "0")))
    _loaded = True


class _RouteToEmulation(TorchDispatchMode):
    """Sends ``bdfast::<op>`` to ``bdfast_emu::<op>``; every other operator runs as usual."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "bdfast":
            emulated = getattr(torch.ops.bdfast_emu, func._schema.name.split("::")[1])
            return getattr(emulated, func._overloadname)(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def active() -> Iterator[None]:
    """Within: ``torch.ops.bdfast`` runs the emulated CUDA kernels (on CPU tensors)."""
    load()
    with _RouteToEmulation():
        yield


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Within: the CPU kernels again, e.g. to compare the emulated CUDA kernels with them."""
    from torch.utils._python_dispatch import _pop_mode_temporarily, _get_current_dispatch_mode
    if not isinstance(_get_current_dispatch_mode(), _RouteToEmulation):
        yield
        return
    with _pop_mode_temporarily():
        yield
