"""Loading the compiled extension ``bdfast._C`` and reporting which backends are usable."""
from __future__ import annotations

import importlib
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

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


def cuda_arch_list() -> Optional[List[str]]:
    """The CUDA architectures the kernels were built for (e.g. ``["8.0", "9.0+PTX"]``), or None
    without CUDA kernels (or with an extension built before the list was recorded)."""
    recorded = getattr(_C, "cuda_arch_list", None)
    raw = recorded() if recorded is not None else None
    return raw.split("_") if raw else None


def has_kernel_image(capability: Tuple[int, int], archs: Sequence[str]) -> Optional[bool]:
    """Whether kernels built for ``archs`` can run on a GPU of compute ``capability``.

    They can when an entry is the GPU's major version with a minor not above the GPU's (binary
    code of sm_80 runs on sm_86) or ends in "+PTX" at or below the GPU's version (the driver
    compiles the PTX for newer GPUs, never for older ones). None when an entry is not a
    version number (TORCH_CUDA_ARCH_LIST also takes names such as "Ampere"): then it is unknown.
    """
    for entry in archs:
        version = entry[:-len("+PTX")] if entry.endswith("+PTX") else entry
        try:
            major, minor = (int(part) for part in version.split("."))
        except ValueError:
            return None
        if major == capability[0] and minor <= capability[1]:
            return True
        if entry.endswith("+PTX") and (major, minor) <= tuple(capability):
            return True
    return False


_no_image_warned: set = set()


def cuda_image_problem(device: torch.device) -> Optional[str]:
    """A sentence saying why the CUDA kernels cannot run on ``device``, or None if they can
    (or if that cannot be told)."""
    archs = cuda_arch_list()
    if archs is None:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    if has_kernel_image(capability, archs) is not False:
        return None
    major, minor = capability
    return (f"the CUDA kernels were built for {';'.join(archs)}, which has no kernel image for "
            f"cuda:{index} ({torch.cuda.get_device_name(index)}, compute capability "
            f"{major}.{minor}); rebuild on that machine (setup.py then adds its GPU) or with "
            f"TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\"")


def warn_no_image_once(device: torch.device, problem: str) -> None:
    """The one warning per GPU when ``backend="auto"`` falls back to the reference there."""
    if device.index not in _no_image_warned:
        _no_image_warned.add(device.index)
        warnings.warn(f"bdfast: {problem}; the ops fall back to the pure-PyTorch reference on "
                      "it, which is correct but slower.", RuntimeWarning, stacklevel=4)


def build_info() -> Dict[str, object]:
    """Which backends are compiled and usable here, and a sentence for each that is not.

    Returns a dict with ``native_cpu`` and ``native_cuda`` (kernels compiled for every op),
    ``cpu_isa`` (the instruction set the vectorised CPU kernels use: "generic", "avx2" or
    "avx512"; the environment variable ``BDFAST_CPU_ISA`` can name a narrower one; None without
    the extension), ``cuda_device`` (a GPU is visible to torch), ``torch`` and ``torch_cuda``
    (versions), ``cuda_archs`` (the architectures the CUDA kernels were built for) and ``why``
    (backend name -> reason it is unavailable; ``cuda_kernel_image`` when a visible GPU is not
    covered by ``cuda_archs``, so that ``backend="auto"`` uses the reference there; ``selftest``
    when a CUDA kernel failed its automatic self-check, see :mod:`bdfast.ops.selftest`).
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
            why["native_cuda"] = ("the extension was built without CUDA kernels (torch without "
                                  "CUDA or nvcc not found at build time); " + REBUILD_HINT)
    if not cuda_device:
        why["cuda_device"] = "torch sees no CUDA device"
    if native_cuda and cuda_device:
        problems = [cuda_image_problem(torch.device("cuda", i))
                    for i in range(torch.cuda.device_count())]
        problems = [p for p in problems if p is not None]
        if problems:
            why["cuda_kernel_image"] = "; ".join(problems)
    cpu_isa = _C.cpu_isa() if _C is not None else None
    return {"native_cpu": native_cpu, "native_cuda": native_cuda, "cpu_isa": cpu_isa,
            "cuda_device": cuda_device, "cuda_archs": cuda_arch_list(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "why": why}
