"""Where the op tests run: the CPU always, a GPU when there is one and the extension has CUDA
kernels (tests that need one are also marked ``gpu``)."""
from __future__ import annotations

import pytest
import torch

import bdfast

CUDA = "cuda"
CUDA_KERNELS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not bdfast.backend_info()["native_cuda"],
                       reason="the extension was built without CUDA kernels"),
]
DEVICES = ["cpu", pytest.param(CUDA, marks=CUDA_KERNELS)]


def cuda_kernels(test):
    """Marks a test of the CUDA kernels alone (see :data:`CUDA_KERNELS`)."""
    for mark in reversed(CUDA_KERNELS):
        test = mark(test)
    return test
