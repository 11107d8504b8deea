"""Loading the compiled extension ``bdfast._C`` and reporting which backends are usable."""
from __future__ import annotations

import importlib
import warnings
from typing import Dict, Optional

import torch

OPS = ("medic_clone_loss", "medic_clone_loss_backward", "histogram_entropy", "gaussian_kl",
       "layer_outliers")
REBUILD_HINT = ("rebuild the extension with `make build` (or `pip install --no-build-isolation "
                "-e .`) on a machine with a CUDA build of torch and nvcc")

_load_error: Optional[BaseException]
_C = None
try:
    _C = importlib.import_module("bdfast._C")  # loading it registers torch.ops.bdfast.*
    _load_error = None
except ImportError as error:  # the package must keep working on the pure-PyTorch reference
    _load_error = error
    warnings.warn(f"bdfast: the compiled extension could not be loaded ({error}); every op falls "
                  "back to the pure-PyTorch reference, which is correct but slower.",
                  RuntimeWarning, stacklevel=2)


def loaded() -> bool:
    """Whether ``bdfast._C`` is loaded and ``torch.ops.bdfast`` exists."""
    return _load_error is None


def has_kernel(op: str, device_type: str) -> bool:
    """Whether the compiled ``bdfast::<op>`` has a kernel for ``device_type`` ("cpu"/"cuda")."""
    if not loaded():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"bdfast::{op}", key)


def backend_info() -> Dict[str, object]:
    """Which backends are compiled and usable here, and a sentence for each that is not.

    Returns a dict with ``native_cpu`` and ``native_cuda`` (kernels compiled for every op),
    ``cpu_isa`` (the instruction set the vectorised CPU kernels use: "generic", "avx2" or
    "avx512"; the environment variable ``BDFAST_CPU_ISA`` can name a narrower one; None without
    the extension), ``cuda_device`` (a GPU is visible to torch), ``torch`` and ``torch_cuda``
    (versions) and ``why`` (backend name -> reason it is unavailable).
    """
    native_cpu = all(has_kernel(op, "cpu") for op in OPS)
    native_cuda = all(has_kernel(op, "cuda") for op in OPS)
    cuda_device = torch.cuda.is_available()
    why: Dict[str, str] = {}
    if not loaded():
        why["native_cpu"] = f"the compiled extension bdfast._C failed to import: {_load_error}"
        why["native_cuda"] = why["native_cpu"]
    else:
        if not native_cpu:
            why["native_cpu"] = "the extension was built without CPU kernels for every op"
        if not native_cuda:
            why["native_cuda"] = ("the extension was built without CUDA kernels (torch without CUDA "
                                  "or nvcc not found at build time); " + REBUILD_HINT)
    if not cuda_device:
        why["cuda_device"] = "torch sees no CUDA device"
    cpu_isa = _C.cpu_isa() if _C is not None else None
    return {"native_cpu": native_cpu, "native_cuda": native_cuda, "cpu_isa": cpu_isa,
            "cuda_device": cuda_device,
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "why": why}
