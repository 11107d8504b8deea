"""Wherever the CUDA kernels can be built, the extension has one for every op (no GPU needed).

setup.py compiles csrc/cuda/ when the installed torch is a CUDA build, nvcc is found
(``CUDA_HOME``, ``/usr/local/cuda`` or ``PATH``) and ``BDFAST_NO_CUDA`` is not set. Where those
hold, a build that skipped the kernels, or a kernel that failed to register, fails here, on
CI's GPU-less machines as much as on a GPU.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import bdfast
from bdfast import _extension


def _why_cuda_cannot_be_built():
    """The reason setup.py would skip the CUDA kernels here, or None (the same rules)."""
    if os.environ.get("BDFAST_NO_CUDA", "0") not in ("", "0"):
        return "BDFAST_NO_CUDA is set"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    home = os.environ.get("CUDA_HOME")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    if not home and shutil.which("nvcc"):
        home = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))
    if not home or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return "nvcc was not found"
    return None


@pytest.mark.skipif(not _extension.loaded(), reason="the compiled extension is not loaded")
def test_every_op_has_a_cuda_kernel_where_cuda_can_be_built():
    why = _why_cuda_cannot_be_built()
    if why is not None:
        pytest.skip(f"the CUDA kernels are not built here: {why}")
    missing = [op for op in _extension.OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"bdfast::{op}", "CUDA")]
    assert not missing, (f"torch {torch.__version__} has CUDA {torch.version.cuda} and nvcc is "
                         f"present, but bdfast._C has no CUDA kernel for {missing}; "
                         f"{_extension.REBUILD_HINT}")
    assert bdfast.backend_info()["native_cuda"]
