"""``bdfast selftest`` and the automatic self-check of ``backend="auto"`` on a GPU.

The GPU wiring is tested without a GPU: the dispatcher is told the kernels exist for "cuda",
and the check runs on the emulated CUDA kernels (or the CPU's), with one kernel made to fail.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bdfast
from support import emulated_cuda
from bdfast import cli
from bdfast.ops import _extension, selftest
from bdfast.ops import _dispatch

pytestmark = pytest.mark.skipif(not bdfast.backend_info()["native_cpu"],
                                reason="the compiled CPU kernels are not available")


def _wrong(x: torch.Tensor) -> torch.Tensor:
    return ~x if x.dtype == torch.bool else x + 1


class BreakKernel(TorchDispatchMode):
    """Makes the compiled ``bdfast::<op>`` of every op named return wrong outputs."""

    def __init__(self, *ops: str):
        super().__init__()
        self.names = {f"bdfast::{op}" for op in ops}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.name in self.names:
            out = _wrong(out) if isinstance(out, torch.Tensor) else type(out)(map(_wrong, out))
        return out


def test_selftest_passes_on_the_cpu(capsys):
    assert cli.main(["selftest"]) == 0
    table = capsys.readouterr().out
    for op in selftest.CHECKED_OPS:
        assert f"{op:18s} cpu" in table
    assert "4 passed, 0 failed" in table


def test_selftest_passes_on_the_emulated_cuda_kernels():
    with emulated_cuda.active():
        checks = selftest.run(["cpu"])
    assert all(c.passed for c in checks), selftest.format_table(checks)


@pytest.mark.parametrize("op", selftest.CHECKED_OPS)
def test_selftest_fails_a_broken_kernel(op, capsys):
    with BreakKernel(op):
        code = cli.main(["selftest", "--device", "cpu"])
    table = capsys.readouterr().out
    assert code == 1
    failed = [line for line in table.splitlines() if "FAIL" in line]
    assert len(failed) == 1 and failed[0].startswith(op)


def test_selftest_reports_a_kernel_that_raises():
    class Raise(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name == "bdfast::gaussian_kl":
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return func(*args, **(kwargs or {}))

    with Raise():
        check = selftest.check_op("gaussian_kl", "cpu")
    assert not check.passed and "illegal memory access" in check.error


@pytest.fixture
def pretend_gpu(monkeypatch):
    """The dispatcher believes CUDA kernels exist and fit cuda:0; each op's check runs on the
    emulated CUDA kernels, with ``broken`` (a set of op names) made to fail. Yields the list of
    checks run."""
    ran, broken = [], set()
    real_has_kernel = _extension.has_kernel
    monkeypatch.setattr(_extension, "has_kernel",
                        lambda op, device_type: real_has_kernel(op, "cpu"))
    monkeypatch.setattr(_extension, "cuda_image_problem", lambda device: None)
    monkeypatch.setattr(selftest, "_gpu_checked", {})
    monkeypatch.delenv("BDFAST_SKIP_SELFTEST", raising=False)
    real_check = selftest.check_op

    def check_on_emulated_cuda(op, device):
        ran.append((op, str(device)))
        with emulated_cuda.active(), BreakKernel(*broken):
            return real_check(op, "cpu")

    monkeypatch.setattr(selftest, "check_op", check_on_emulated_cuda)
    yield ran, broken


def test_auto_falls_back_once_when_a_gpu_kernel_fails_its_check(pretend_gpu):
    ran, broken = pretend_gpu
    broken.add("gaussian_kl")
    gpu = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match="gaussian_kl kernel failed its self-check on cuda:0"):
        assert not _dispatch.use_native("gaussian_kl", "auto", gpu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second check
        assert not _dispatch.use_native("gaussian_kl", "auto", gpu)
        assert _dispatch.use_native("layer_outliers", "auto", gpu)
        assert _dispatch.use_native("layer_outliers", "auto", gpu)
    assert ran == [("gaussian_kl", "cuda:0"), ("layer_outliers", "cuda:0")]
    # backend="native" insists on the kernel; backend_info says why auto does not use it.
    assert _dispatch.use_native("gaussian_kl", "native", gpu)
    assert "gaussian_kl kernel failed its self-check on cuda:0" in bdfast.backend_info()["why"][
        "selftest"]


def test_the_medic_backward_is_checked_with_the_forward(pretend_gpu):
    ran, broken = pretend_gpu
    broken.add("medic_clone_loss_backward")
    with pytest.warns(RuntimeWarning, match="medic_clone_loss kernel failed"):
        assert not _dispatch.use_native("medic_clone_loss", "auto", torch.device("cuda", 1))
    assert ran == [("medic_clone_loss", "cuda:1")]


def test_skip_selftest(pretend_gpu, monkeypatch):
    ran, broken = pretend_gpu
    broken.add("gaussian_kl")
    monkeypatch.setenv("BDFAST_SKIP_SELFTEST", "1")
    assert _dispatch.use_native("gaussian_kl", "auto", torch.device("cuda", 0))
    assert ran == [] and "selftest" not in bdfast.backend_info()["why"]


def test_no_check_on_the_cpu(monkeypatch):
    monkeypatch.setattr(selftest, "check_op", lambda op, device: pytest.fail("checked"))
    assert _dispatch.use_native("gaussian_kl", "auto", torch.device("cpu"))


@contextlib.contextmanager
def _torch_setting(get, set_, value):
    """``set_(value)`` for the block, then back to what ``get()`` gave before it."""
    previous = get()
    set_(value)
    try:
        yield
    finally:
        set_(previous)


def _default_dtype(dtype):
    return _torch_setting(torch.get_default_dtype, torch.set_default_dtype, dtype)


def _deterministic():
    return _torch_setting(torch.are_deterministic_algorithms_enabled,
                          torch.use_deterministic_algorithms, True)


# Each of these made a correct kernel fail its check when the check ran in the caller's state.
CALLER_STATES = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "float64_default_dtype": lambda: _default_dtype(torch.float64),
    "float16_default_dtype": lambda: _default_dtype(torch.float16),
    "autocast_bfloat16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    "deterministic_algorithms": _deterministic,
    "meta_default_device": lambda: torch.device("meta"),
}


@pytest.mark.parametrize("state", sorted(CALLER_STATES))
@pytest.mark.parametrize("op", selftest.CHECKED_OPS)
def test_a_check_passes_whatever_the_callers_torch_state(op, state):
    with emulated_cuda.active(), CALLER_STATES[state]():
        check = selftest.check_op(op, "cpu")
    assert check.passed, selftest.format_table([check])


@pytest.mark.parametrize("state", sorted(CALLER_STATES))
def test_the_callers_state_never_switches_auto_away_from_a_good_kernel(pretend_gpu, state):
    ran, _ = pretend_gpu
    gpu = torch.device("cuda", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with CALLER_STATES[state]():
            assert all(_dispatch.use_native(op, "auto", gpu) for op in selftest.CHECKED_OPS)
    assert [op for op, _ in ran] == list(selftest.CHECKED_OPS)
    assert "selftest" not in bdfast.backend_info()["why"]


def test_a_check_leaves_the_callers_state_as_it_was():
    with torch.no_grad(), _default_dtype(torch.float64):
        check = selftest.check_op("medic_clone_loss", "cpu")
        assert not torch.is_grad_enabled() and torch.get_default_dtype() == torch.float64
    assert check.passed
