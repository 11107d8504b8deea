"""Backend selection and the input checks shared by the op wrappers."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from bdfast.ops import _extension

BACKENDS = ("auto", "reference", "native")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT32_MAX = torch.finfo(torch.float32).max

# The automatic GPU self-check, :func:`bdfast.ops.selftest.gpu_problem`. ``bdfast.ops`` sets it
# when it is imported: the check runs the ops, which import this module, so importing it here
# would close a cycle.
gpu_self_check: Optional[Callable[[str, torch.device], Optional[str]]] = None


def use_native(op: str, backend: str, device: torch.device) -> bool:
    """Decide whether ``op`` on ``device`` runs the compiled kernel or the reference.

    ``"auto"`` takes the kernel when one is compiled for the device (on a GPU: for its
    architecture, and once it has passed its self-check there, see :mod:`bdfast.ops.selftest`;
    otherwise it warns once and uses the reference), ``"reference"`` never does, and
    ``"native"`` insists, failing with a sentence that says how to get the kernel.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    available = _extension.has_kernel(op, device.type)
    if available and device.type == "cuda":
        # A kernel compiled for other GPUs fails with "no kernel image is available".
        problem = _extension.cuda_image_problem(device)
        if problem is not None:
            if backend == "native":
                raise RuntimeError(f"backend='native' was requested for {op} on {device}, but "
                                   f"{problem}, or use backend='auto'.")
            _extension.warn_no_image_once(device, problem)
            return False
        if backend == "auto" and gpu_self_check is not None \
                and gpu_self_check(op, device) is not None:
            return False
    if backend == "native" and not available:
        if not _extension.loaded():
            reason = "the compiled extension bdfast._C is not loaded"
        else:
            reason = f"this build has no {device.type.upper()} kernel for it"
        raise RuntimeError(f"backend='native' was requested for {op} on {device}, but {reason}; "
                           f"{_extension.REBUILD_HINT}, or use backend='auto'.")
    return available


def check_tensor(value, name: str, *, dims=None, dtypes=FLOAT_DTYPES) -> Tensor:
    """Fail with one sentence naming ``name`` unless ``value`` is a tensor of the right kind."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(value.dtype).replace('torch.', '')}; "
                        f"expected one of {names}")
    if dims is not None and value.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, "
                         f"got shape {list(value.shape)}")
    return value


def check_scalar(value, name: str, *, positive: bool = False) -> float:
    """``value`` as a float, or a one-sentence error unless it is a real number that stays
    finite in float32 (and is > 0 with ``positive``).

    The kernels compute in float32 while the reference mixes Python floats (float64) into its
    float32 arithmetic, so a value such as 1e300, finite in float64 but inf in float32, would
    give different results on different backends; both are refused here, in one place.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    if not abs(number) <= FLOAT32_MAX:  # also false for NaN
        raise ValueError(f"{name} must be finite in float32 (|{name}| <= {FLOAT32_MAX:.4g}), "
                         f"got {value}")
    if positive and not number > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return number


def check_same_device(named: Iterable[tuple[str, Tensor]]) -> torch.device:
    """The common device of the named tensors, or a one-sentence error naming the odd one."""
    first_name, device = None, None
    for name, tensor in named:
        if device is None:
            first_name, device = name, tensor.device
        elif tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but {first_name} is on {device}; "
                             "all inputs must be on the same device")
    return device


def check_offsets(offsets, k: int, device: torch.device, name: str = "offsets") -> Tensor:
    """Layer boundaries as int64 [L+1] on ``device``: starting at 0, non-decreasing, ending at k.

    ``None`` means a single layer. The check runs on the host copy so that a bad offsets
    vector fails clearly instead of reading out of bounds in a kernel.
    """
    if offsets is None:
        return torch.tensor([0, k], dtype=torch.int64, device=device)
    if not isinstance(offsets, Tensor):
        offsets = torch.as_tensor(offsets, dtype=torch.int64)
    if offsets.dim() != 1 or offsets.numel() < 2 or offsets.dtype.is_floating_point:
        raise ValueError(f"{name} must be a 1-D integer tensor [L+1] of layer boundaries, "
                         f"got shape {list(offsets.shape)} and dtype {offsets.dtype}")
    if not torch.compiler.is_compiling():
        host = offsets.detach().to("cpu", torch.int64)
        if host[0] != 0 or host[-1] != k or bool((host[1:] < host[:-1]).any()):
            raise ValueError(f"{name} must start at 0, never decrease and end at {k} (the number "
                             f"of packed columns), got {host.tolist()}")
    return offsets.to(device=device, dtype=torch.int64).contiguous()


def fake_check(condition, message: str) -> None:
    """A fake (meta) kernel's check of what the real kernel checks (csrc/checks.h): under
    torch.compile and FakeTensorMode the call then fails as the real op would, instead of
    returning a made-up shape."""
    torch._check(condition, lambda: message)


def fake_check_offsets(offsets: Tensor, op: str) -> None:
    fake_check(offsets.dim() == 1 and offsets.shape[0] >= 2 and offsets.dtype == torch.int64,
               f"{op}: offsets must be a 1-D int64 tensor [L+1], got shape "
               f"{list(offsets.shape)} and dtype {offsets.dtype}")
