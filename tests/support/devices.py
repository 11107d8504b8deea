"""Where the op tests run.

- ``"cpu"``: the CPU kernels.
- ``"cuda-emu"``: the CUDA kernels (csrc/cuda, their host code included) compiled for the CPU
  execution layer of tests/support/cuda_emu, on CPU tensors. It needs no GPU, so these run in every
  ``make test`` (see ``emulated_cuda.py``).
- ``"cuda"``: the CUDA kernels on a GPU, where there is one and the extension has them (these
  are also marked ``gpu``).

A test parametrises the fixture ``device`` indirectly (``@pytest.mark.parametrize("device",
DEVICES, indirect=True)``, or ``CUDA_DEVICES`` for the CUDA kernels alone) and gets the torch
device its tensors belong on: ``"cpu"`` for ``"cuda-emu"``, whose test then runs with the
``torch.ops.bdfast`` operators routed to the emulated kernels. ``cpu_kernels()`` runs a block on
the CPU kernels again, to compare with them.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch

import bdfast
from support import emulated_cuda

CPU, EMULATED, CUDA = "cpu", "cuda-emu", "cuda"
GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not bdfast.backend_info()["native_cuda"],
                       reason="the extension was built without CUDA kernels"),
]
DEVICES = [CPU, EMULATED, pytest.param(CUDA, marks=GPU)]
CUDA_DEVICES = [EMULATED, pytest.param(CUDA, marks=GPU)]
# For tests of torch code (no bdfast kernel) that should also run on a GPU.
TORCH_DEVICES = [CPU, pytest.param(CUDA, marks=GPU)]


def gpu_only(test):
    """Marks a test that needs the CUDA runtime itself (streams, graph capture)."""
    for mark in reversed(GPU):
        test = mark(test)
    return test


@contextlib.contextmanager
def placed(name: str) -> Iterator[str]:
    """The torch device for the test device ``name``, with its kernels in use while inside."""
    if name == EMULATED:
        with emulated_cuda.active():
            yield CPU
    else:
        yield name


def cpu_kernels():
    """Within: the CPU kernels, also on the emulated CUDA device."""
    return emulated_cuda.suspended()
