"""Each compiled op against the float64 reference, on small awkward inputs, on a given device.

``bdfast selftest`` runs :func:`check_op` for every op on the CPU and on every visible GPU and
prints a table (op, device, max error, tolerance, pass); it exits 1 if any check fails.

On a GPU, ``backend="auto"`` also runs an op's check once per process and device before the
op's first use there (:func:`gpu_problem`; a few milliseconds): a kernel that gives wrong
numbers on that GPU (a driver or compiler problem, an architecture the tests never ran on) then
sends ``auto`` to the reference with one warning, and :func:`bdfast.backend_info` says why.
``BDFAST_SKIP_SELFTEST=1`` turns that check off.

A check runs in its own torch state, whatever its caller's (:func:`_own_state`): gradients on,
outside inference mode and autocast, with explicit dtypes and devices and its own generators, so a
caller's ``no_grad``, default dtype, default device or deterministic flags can never make a
correct kernel fail it (and switch ``auto`` away from that kernel for the rest of the process).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from bdfast import reference
from bdfast.ops import _extension
from bdfast.ops.gaussian_kl import gaussian_kl
from bdfast.ops.histogram_entropy import histogram_entropy
from bdfast.ops.layer_outliers import layer_outliers
from bdfast.ops.medic_clone_loss import medic_clone_loss

# medic_clone_loss's check covers its backward too.
CHECKED_OPS = ("medic_clone_loss", "histogram_entropy", "gaussian_kl", "layer_outliers")


@dataclass
class OpCheck:
    """The outcome of one op's check on one device."""
    op: str
    device: str
    max_error: float  # relative error of the case nearest its tolerance (mismatched flags for
    tolerance: float  # layer_outliers, which must have none)
    error: Optional[str] = None  # the exception the native op raised, if it raised

    @property
    def passed(self) -> bool:
        return self.error is None and self.max_error <= self.tolerance


def rel_err(out: Tensor, ref: Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 over the entries where ref is finite; inf where the two
    disagree on which entries are NaN."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.equal(out.isnan(), ref.isnan()):
        return float("inf")
    keep = ref.isfinite()
    diff = (out[keep] - ref[keep]).norm()
    return float(diff / ref[keep].norm().clamp_min(1e-300))


# Every tensor of a check is created with these explicitly (then moved to the device under test),
# so that the caller's torch.set_default_dtype / set_default_device never reach it.
F32 = dict(dtype=torch.float32, device="cpu")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _medic_layer(shape, dtype, device, seed, channels_last=False):
    """t, s, g, mu, sigma of one layer (as bdfast.defenses.medic collects them)."""
    gen = _generator(seed)
    t = torch.randn(shape, generator=gen, **F32) * 1.5 + 0.2
    s = t + 0.5 * torch.randn(shape, generator=gen, **F32)
    g = 0.05 * torch.randn(shape, generator=gen, **F32)
    dims = [0] + list(range(2, len(shape)))
    mu, sigma = t.mean(dims), t.std(dims) if t[:, 0].numel() > 1 else t.new_ones(shape[1])
    layout = torch.channels_last if channels_last else torch.contiguous_format
    t, s, g = (x.to(device, dtype).contiguous(memory_format=layout) for x in (t, s, g))
    return t, s, g, mu.to(device), sigma.to(device)


Errors = List[Tuple[float, float]]  # (error, tolerance) of each case


def _check_medic(device) -> Errors:
    errors = []
    # A one-element row, odd widths, channels_last, and a row of two CUDA tiles (16,385 elements).
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
        layers = [_medic_layer((1, 1), dtype, device, 0),
                  _medic_layer((3, 5, 3, 7), dtype, device, 1, channels_last=True),
                  _medic_layer((3, 33), dtype, device, 2),
                  _medic_layer((2, 16385), dtype, device, 3)]
        t, s, g, mu, sigma = (list(part) for part in zip(*layers))
        s = [x.detach().requires_grad_() for x in s]
        loss = medic_clone_loss(t, s, g, mu, sigma, tau=5.0, backend="native")
        grads = torch.autograd.grad(loss, s)
        # The float64 reference runs on the CPU, where no deterministic-algorithms flag or
        # device setting of the caller can change or refuse it.
        s64 = [x.detach().cpu().double().requires_grad_() for x in s]
        ref = reference.medic_clone_loss(*([x.cpu().double() for x in part]
                                           for part in (t, s64, g, mu, sigma)), tau=5.0)
        ref_grads = torch.autograd.grad(ref, s64)
        errors += [(rel_err(loss, ref), tol)]
        errors += [(rel_err(a, b), tol) for a, b in zip(grads, ref_grads)]
    return errors


def _activations(n, k, seed, device):
    x = torch.randn(n, k, generator=_generator(seed), **F32).relu() + 0.1 * torch.arange(k, **F32)
    x[:, 1] = 2.0                    # constant: NaN
    x[5, 2] = float("nan")           # non-finite: NaN
    return x.to(device)


def _check_histogram(device) -> Errors:
    x = _activations(300, 9, 4, device)
    offsets = torch.tensor([0, 4, 9], dtype=torch.int64)
    errors = []
    for step in (0.01, 1e-4):  # the second needs several shared-memory passes on a GPU
        out = histogram_entropy(x, offsets, step=step, backend="native")
        ref = reference.histogram_entropy(x.double().cpu(), offsets, step=step)
        errors.append((rel_err(out, ref), 1e-5))
    # The released code's grid, on the same float32 values.
    compat = histogram_entropy(x, offsets, step=0.05, reference_compat=True, backend="native")
    ref = reference.histogram_entropy(x.cpu(), offsets, step=0.05, reference_compat=True)
    errors.append((rel_err(compat, ref), 1e-5))
    return errors


def _check_gaussian_kl(device) -> Errors:
    gen = _generator(5)
    mu_q, var_q = torch.randn(7, generator=gen, **F32), 0.1 + torch.rand(7, generator=gen, **F32)
    mu_p, var_p = mu_q + torch.randn(7, generator=gen, **F32), var_q * 2
    var_p[0], var_q[1] = 0.0, -1.0   # floored at eps
    inputs = (mu_p.half(), var_p, mu_q.bfloat16(), var_q.double())
    out = gaussian_kl(*(v.to(device) for v in inputs), backend="native")
    return [(rel_err(out, reference.gaussian_kl(*(v.double() for v in inputs))), 1e-5)]


def _check_layer_outliers(device) -> Errors:
    scores = torch.randn(73, generator=_generator(6), **F32)
    scores[[3, 40]] = torch.tensor([-6.0, 7.0], **F32)
    scores[10] = float("nan")
    offsets = torch.tensor([0, 1, 30, 30, 73], dtype=torch.int64)  # a one-score layer, an empty one
    errors = []
    for direction in ("low", "high"):
        out = layer_outliers(scores.to(device), offsets, u=2.0, direction=direction,
                                 backend="native")
        ref = reference.layer_outliers(scores, offsets, u=2.0, direction=direction)
        errors.append((float((out.cpu() != ref).sum()), 0.0))  # mismatched flags
    return errors


CHECKS: Dict[str, Callable[[torch.device], Errors]] = {
    "medic_clone_loss": _check_medic,
    "histogram_entropy": _check_histogram,
    "gaussian_kl": _check_gaussian_kl,
    "layer_outliers": _check_layer_outliers,
}


@contextlib.contextmanager
def _own_state(device: torch.device) -> Iterator[None]:
    """The torch state a check runs in, whatever the caller's: gradients on (medic's check
    differentiates), outside inference mode, autocast off on the CPU and on ``device``, and
    factory calls without a device on the CPU. The default dtype is not touched (it is global,
    not per thread); every tensor of a check names its dtype instead."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.device("cpu"))
        for device_type in {"cpu", device.type}:
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def check_op(op: str, device) -> OpCheck:
    """Runs ``op``'s compiled kernel on ``device`` against the float64 reference, in its own
    torch state (:func:`_own_state`)."""
    device = torch.device(device)
    try:
        with _own_state(device):
            errors = CHECKS[op](device)
    except Exception as error:  # a kernel that raises fails its check, with the reason
        return OpCheck(op, str(device), float("nan"), 0.0, f"{type(error).__name__}: {error}")
    # The case furthest from passing: the largest error beyond its tolerance, else the largest
    # share of its tolerance.
    error, tolerance = max(errors, key=lambda e: (e[0] > e[1], e[0] / e[1] if e[1] else e[0]))
    return OpCheck(op, str(device), error, tolerance)


def available_devices() -> List[str]:
    """The CPU, and every GPU torch sees that the extension has kernels for."""
    devices = ["cpu"] if all(_extension.has_kernel(op, "cpu") for op in CHECKED_OPS) else []
    if torch.cuda.is_available() and all(_extension.has_kernel(op, "cuda") for op in CHECKED_OPS):
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())
                    if _extension.cuda_image_problem(torch.device("cuda", i)) is None]
    return devices


def run(devices: Optional[Sequence[str]] = None) -> List[OpCheck]:
    """Every op's check on every device (default: :func:`available_devices`)."""
    return [check_op(op, device) for device in (devices or available_devices())
            for op in CHECKED_OPS]


def format_table(checks: Sequence[OpCheck]) -> str:
    lines = [f"{'op':18s} {'device':8s} {'max error':>10s} {'tolerance':>10s}  result"]
    for c in checks:
        result = "pass" if c.passed else f"FAIL{': ' + c.error if c.error else ''}"
        lines.append(f"{c.op:18s} {c.device:8s} {c.max_error:10.3g} {c.tolerance:10.3g}  {result}")
    return "\n".join(lines)


# ---- the automatic check of backend="auto" on a GPU ------------------------------------------

_gpu_checked: Dict[Tuple[str, str], Optional[str]] = {}


def gpu_problem(op: str, device: torch.device) -> Optional[str]:
    """None if ``op``'s kernel passed its check on ``device`` (run once per process and device),
    else a sentence saying how it failed; warns once when it fails."""
    if os.environ.get("BDFAST_SKIP_SELFTEST", "0") not in ("", "0"):
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (op, f"cuda:{index}")
    if key not in _gpu_checked:
        _gpu_checked[key] = None  # the check calls the op itself, with backend="native"
        result = check_op(op, key[1])
        if not result.passed:
            how = result.error or (f"its error against the float64 reference is "
                                   f"{result.max_error:.3g} (tolerance {result.tolerance:.3g})")
            _gpu_checked[key] = f"the {op} kernel failed its self-check on {key[1]}: {how}"
            warnings.warn(f"bdfast: {_gpu_checked[key]}; backend='auto' uses the pure-PyTorch "
                          "reference for it there (run `bdfast selftest` for all ops).",
                          RuntimeWarning, stacklevel=4)
    return _gpu_checked[key]


def gpu_failures() -> List[str]:
    """The sentences of every failed automatic check so far in this process."""
    return [problem for problem in _gpu_checked.values() if problem is not None]


def backend_info() -> Dict[str, object]:
    """:func:`bdfast.ops._extension.build_info`, with ``why["selftest"]`` when a CUDA kernel
    failed its automatic self-check in this process (:func:`gpu_problem`)."""
    info = _extension.build_info()
    if gpu_failures():
        info["why"]["selftest"] = "; ".join(gpu_failures())
    return info
