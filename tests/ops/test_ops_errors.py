"""Bad input to the ops fails with one clear sentence naming the argument
(docs/ops.md, "Bad input").

The "meta" device stands in for a second device, so the device checks run without a GPU.
"""
from __future__ import annotations

import contextlib
import math
import re

import pytest
import torch

import bdfast
from support import medic_cases
from bdfast import ops
from bdfast.ops import _extension
from support.devices import CUDA, CUDA_DEVICES, cpu_kernels, gpu_only

NATIVE_CPU = bdfast.backend_info()["native_cpu"]
needs_kernels = pytest.mark.skipif(not NATIVE_CPU, reason="the compiled CPU kernels are missing")


@contextlib.contextmanager
def raises_naming(exc_type, *names):
    """pytest.raises that also checks the message is one line mentioning each of ``names``."""
    with pytest.raises(exc_type) as info:
        yield info
    message = str(info.value)
    assert "\n" not in message.strip(), message
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"


def medic_args(layers=2):
    shapes = [(2, 3, 4, 4), (2, 5)][:layers]
    t = [torch.randn(s) for s in shapes]
    s = [torch.randn(s, requires_grad=True) for s in shapes]
    g = [torch.randn(s) for s in shapes]
    mu = [torch.zeros(sh[1]) for sh in shapes]
    sigma = [torch.ones(sh[1]) for sh in shapes]
    return t, s, g, mu, sigma


# --- medic_clone_loss -------------------------------------------------------------------------

def test_medic_lists_required():
    t, s, g, mu, sigma = medic_args()
    with raises_naming(TypeError, "t", "list"):
        ops.medic_clone_loss(t[0], s, g, mu, sigma)
    with raises_naming(TypeError, "sigma", "list"):
        ops.medic_clone_loss(t, s, g, mu, sigma[0])


def test_medic_mismatched_list_lengths():
    t, s, g, mu, sigma = medic_args()
    with raises_naming(ValueError, "same length", "2, 1, 2, 2, 2"):
        ops.medic_clone_loss(t, s[:1], g, mu, sigma)
    with raises_naming(ValueError, "non-empty"):
        ops.medic_clone_loss([], [], [], [], [])


def test_medic_shapes():
    t, s, g, mu, sigma = medic_args()
    with raises_naming(ValueError, "s[1]", "[2, 6]", "t[1]"):
        ops.medic_clone_loss(t, [s[0], torch.randn(2, 6)], g, mu, sigma)
    with raises_naming(ValueError, "g[0]"):
        ops.medic_clone_loss(t, s, [g[0][:, :2], g[1]], mu, sigma)
    with raises_naming(ValueError, "mu[0]", "[3]"):
        ops.medic_clone_loss(t, s, g, [torch.zeros(4), mu[1]], sigma)
    with raises_naming(ValueError, "sigma[1]"):
        ops.medic_clone_loss(t, s, g, mu, [sigma[0], torch.ones(5, 1)])
    with raises_naming(ValueError, "t[0]", "[B, C, *spatial]"):
        ops.medic_clone_loss([torch.randn(4)], [torch.randn(4)], [torch.randn(4)],
                             [torch.zeros(4)], [torch.ones(4)])
    with raises_naming(ValueError, "t[0]", "empty"):
        ops.medic_clone_loss([torch.randn(0, 3)], [torch.randn(0, 3)], [torch.randn(0, 3)],
                             [torch.zeros(3)], [torch.ones(3)])


def test_medic_dtypes():
    t, s, g, mu, sigma = medic_args()
    with raises_naming(TypeError, "g[1]", "int64"):
        ops.medic_clone_loss(t, s, [g[0], g[1].long()], mu, sigma)
    with raises_naming(TypeError, "t[0]"):
        ops.medic_clone_loss([t[0].bool(), t[1]], s, g, mu, sigma)


def test_medic_devices():
    t, s, g, mu, sigma = medic_args()
    with raises_naming(ValueError, "s[1]", "meta", "cpu"):
        ops.medic_clone_loss(t, [s[0], s[1].detach().to("meta")], g, mu, sigma)
    with raises_naming(ValueError, "mu[0]", "meta"):
        ops.medic_clone_loss(t, s, g, [mu[0].to("meta"), mu[1]], sigma)


# GPU only: the emulated CUDA device is the CPU, and no device ranks below the CPU in dispatch.
@gpu_only
def test_cuda_medic_rejects_inputs_on_two_devices():
    t, s, g, mu, sigma = medic_cases.make_layer((2, 3, 4, 4), device=CUDA)
    with pytest.raises(RuntimeError, match="same CUDA device"):
        torch.ops.bdfast.medic_clone_loss([t], [s], [g], [mu.cpu()], [sigma], 5.0, 1e-5, False)


def test_medic_options():
    args = medic_args()
    with raises_naming(ValueError, "tau"):
        ops.medic_clone_loss(*args, tau=float("nan"))
    with raises_naming(ValueError, "eps"):
        ops.medic_clone_loss(*args, eps=0.0)
    with raises_naming(ValueError, "backend", "'fast'"):
        ops.medic_clone_loss(*args, backend="fast")


# --- histogram_entropy ------------------------------------------------------------------------

def test_histogram_input():
    with raises_naming(ValueError, "x", "2 dimensions"):
        ops.histogram_entropy(torch.randn(10))
    with raises_naming(TypeError, "x", "int32"):
        ops.histogram_entropy(torch.ones(10, 3, dtype=torch.int32))
    with raises_naming(ValueError, "x", "2 samples"):
        ops.histogram_entropy(torch.randn(1, 3))
    with raises_naming(ValueError, "step"):
        ops.histogram_entropy(torch.randn(10, 3), step=0.0)
    with raises_naming(ValueError, "backend"):
        ops.histogram_entropy(torch.randn(10, 3), backend="gpu")


@pytest.mark.parametrize("offsets", [[0, 2], [1, 3], [0, 2, 1, 3], [0, 4]])
def test_histogram_bad_offsets(offsets):
    with raises_naming(ValueError, "offsets", "end at 3"):
        ops.histogram_entropy(torch.randn(10, 3), torch.tensor(offsets))


def test_histogram_offsets_kind():
    with raises_naming(ValueError, "offsets", "1-D integer"):
        ops.histogram_entropy(torch.randn(10, 3), torch.tensor([0.0, 3.0]))
    with raises_naming(ValueError, "offsets", "1-D integer"):
        ops.histogram_entropy(torch.randn(10, 3), torch.tensor([[0, 3]]))
    with raises_naming(ValueError, "offsets"):
        ops.histogram_entropy(torch.randn(10, 3), torch.tensor([3]))


@needs_kernels
def test_histogram_kernel_checks_its_own_input():
    # The registered op is public too (torch.ops.bdfast.*), so the kernel validates as well.
    x = torch.randn(10, 3)
    with pytest.raises(RuntimeError, match="offsets must start at 0"):
        torch.ops.bdfast.histogram_entropy(x, torch.tensor([0, 2]), 0.01, True)
    with pytest.raises(RuntimeError, match="offsets must be a 1-D int64"):
        torch.ops.bdfast.histogram_entropy(x, torch.tensor([0, 3], dtype=torch.int32), 0.01,
                                           False)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        torch.ops.bdfast.histogram_entropy(x.double(), torch.tensor([0, 3]), 0.01, False)
    with pytest.raises(RuntimeError, match="step must be positive"):
        torch.ops.bdfast.histogram_entropy(x, torch.tensor([0, 3]), -1.0, False)


# --- gaussian_kl and layer_outliers -----------------------------------------------------------

def test_gaussian_kl_input():
    v = [torch.rand(6) for _ in range(4)]
    with raises_naming(ValueError, "var_q", "[5]", "mu_p"):
        ops.gaussian_kl(v[0], v[1], v[2], torch.rand(5))
    with raises_naming(ValueError, "mu_q", "meta"):
        ops.gaussian_kl(v[0], v[1], v[2].to("meta"), v[3])
    with raises_naming(TypeError, "var_p", "int64"):
        ops.gaussian_kl(v[0], torch.ones(6, dtype=torch.long), v[2], v[3])
    with raises_naming(ValueError, "mu_p", "1 dimensions"):
        ops.gaussian_kl(v[0].view(2, 3), v[1], v[2], v[3])
    with raises_naming(ValueError, "eps"):
        ops.gaussian_kl(*v, eps=-1.0)


@needs_kernels
def test_gaussian_kl_kernel_checks_shapes():
    with pytest.raises(RuntimeError, match="same length"):
        torch.ops.bdfast.gaussian_kl(torch.rand(3), torch.rand(3), torch.rand(4), torch.rand(3),
                                     1e-5)


def test_layer_outliers_input():
    scores = torch.randn(10)
    with raises_naming(ValueError, "direction", "'up'"):
        ops.layer_outliers(scores, direction="up")
    with raises_naming(ValueError, "scores", "1 dimensions"):
        ops.layer_outliers(scores.view(2, 5))
    with raises_naming(TypeError, "scores", "int64"):
        ops.layer_outliers(torch.arange(10))
    with raises_naming(ValueError, "offsets", "end at 10"):
        ops.layer_outliers(scores, torch.tensor([0, 4, 9]))


@needs_kernels
def test_layer_outliers_kernel_checks_offsets():
    with pytest.raises(RuntimeError, match="layer_outliers: offsets must start at 0"):
        torch.ops.bdfast.layer_outliers(torch.randn(10), torch.tensor([0, 6, 4, 10]), 3.0, False)


@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
@pytest.mark.parametrize("offsets", [[0, 50, 10, 64], [0, 70], [1, 64]])
def test_cuda_kernels_check_offsets_themselves(device, offsets):
    # The Python wrapper's check is skipped under torch.compile; the ops check on their own.
    bad = torch.tensor(offsets, device=device)
    with pytest.raises(RuntimeError, match="layer_outliers: offsets must start at 0"):
        torch.ops.bdfast.layer_outliers(torch.randn(64, device=device), bad, 3.0, False)
    with pytest.raises(RuntimeError, match="histogram_entropy: offsets must start at 0"):
        torch.ops.bdfast.histogram_entropy(torch.randn(20, 64, device=device), bad, 0.01, True)


# --- backends ---------------------------------------------------------------------------------

def test_native_backend_without_a_kernel_for_the_device():
    v = [torch.rand(6, device="meta") for _ in range(4)]
    with raises_naming(RuntimeError, "backend='native'", "gaussian_kl", "meta",
                       "backend='auto'"):
        ops.gaussian_kl(*v, backend="native")
    # "auto" falls back to the reference, which runs on any device.
    assert ops.gaussian_kl(*v).device.type == "meta"


def test_native_backend_without_the_kernel(monkeypatch):
    monkeypatch.setattr(_extension, "has_kernel", lambda op, device_type: False)
    args = medic_args()
    with raises_naming(RuntimeError, "backend='native'", "medic_clone_loss", "make build"):
        ops.medic_clone_loss(*args, backend="native")
    # "auto" still works, on the reference.
    assert torch.isfinite(ops.medic_clone_loss(*args))


def test_backend_info():
    info = bdfast.backend_info()
    assert {"native_cpu", "native_cuda", "cuda_device", "torch", "torch_cuda", "why"} <= set(info)
    assert all(isinstance(info[k], bool) for k in ("native_cpu", "native_cuda", "cuda_device"))
    assert info["torch"] == torch.__version__ and info["torch_cuda"] == torch.version.cuda
    assert info["cuda_device"] == torch.cuda.is_available()
    for key in ("native_cpu", "native_cuda", "cuda_device"):
        # A missing backend always comes with its reason, a present one never does.
        assert (key in info["why"]) == (not info[key]), (key, info["why"])
        if key in info["why"]:
            assert isinstance(info["why"][key], str) and info["why"][key]
    if not info["native_cuda"] and _extension.loaded():
        assert re.search("rebuild", info["why"]["native_cuda"])


# --- memory safety and backend agreement on extreme input -------------------------------------

@needs_kernels
@pytest.mark.parametrize("bad", ["short", "1-D", "3 columns", "float64"])
def test_medic_backward_kernel_checks_row_stats(bad):
    # Reachable through torch.ops.bdfast directly; a short row_stats was read past its end.
    t, s, g, mu, sigma = (list(part) for part in medic_args())
    _, row_stats = torch.ops.bdfast.medic_clone_loss(t, s, g, mu, sigma, 5.0, 1e-5, False)
    broken = {"short": row_stats[:1], "1-D": row_stats.flatten(), "3 columns": row_stats[:, :3],
              "float64": row_stats.double()}[bad]
    with pytest.raises(RuntimeError, match="row_stats must be the forward's float32"):
        torch.ops.bdfast.medic_clone_loss_backward(torch.ones(()), t, s, g, mu, sigma, broken,
                                                   5.0, 1e-5, False)


@pytest.mark.parametrize("backend", ["reference"] + (["native"] if NATIVE_CPU else []))
def test_histogram_compat_bin_count_is_bounded(backend):
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="more than the 16777216 allowed"):
        ops.histogram_entropy(x, step=1e-8, reference_compat=True, backend=backend)


@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
def test_cuda_histogram_compat_bin_count_is_bounded_like_the_cpu(device):
    # The CUDA kernel needs no edge per bin, but the op refuses what the CPU kernel and the
    # reference refuse, with the same sentence (layer 0 is empty, layer 1 too wide).
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    offsets = torch.tensor([0, 0, 4])
    with pytest.raises(ValueError, match="bins for layer 1 .* more than the 16777216") as gpu:
        ops.histogram_entropy(x.to(device), offsets, step=1e-8, reference_compat=True,
                              backend="native")
    with cpu_kernels(), pytest.raises(ValueError) as cpu:
        ops.histogram_entropy(x, offsets, step=1e-8, reference_compat=True, backend="native")
    assert str(gpu.value).split("\n")[0] == str(cpu.value).split("\n")[0]
    # The same columns at a step the grid holds.
    ops.histogram_entropy(x.to(device), offsets, step=1e-6, reference_compat=True,
                          backend="native")


@needs_kernels
def test_histogram_default_tiny_step_agrees_without_a_dense_histogram():
    # Every sample in its own bin: h = ln(N * step) on both backends, and the reference no longer
    # allocates one count per bin (4 x 5e9 here).
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    native = ops.histogram_entropy(x, step=1e-9, backend="native")
    reference = ops.histogram_entropy(x, step=1e-9, backend="reference")
    torch.testing.assert_close(native, reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(native, torch.full((4,), math.log(50 * 1e-9)), rtol=1e-6, atol=0)


BACKENDS = ["reference"] + (["native"] if NATIVE_CPU else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step", [math.inf, 1e300, -math.inf, math.nan])
def test_histogram_step_outside_float32_is_refused_on_every_backend(backend, step):
    with raises_naming(ValueError, "step"):
        ops.histogram_entropy(torch.randn(10, 3), step=step, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_medic_tau_and_eps_outside_float32_are_refused_on_every_backend(backend):
    args = medic_args()
    with raises_naming(ValueError, "tau", "float32"):
        ops.medic_clone_loss(*args, tau=1e300, backend=backend)
    with raises_naming(ValueError, "eps", "float32"):
        ops.medic_clone_loss(*args, eps=1e300, backend=backend)
    with raises_naming(ValueError, "eps", "float32"):
        ops.gaussian_kl(*(torch.rand(3) for _ in range(4)), eps=math.inf, backend=backend)


@needs_kernels
def test_medic_overflowing_activations_give_nan_on_both_backends():
    t, s, g, mu, sigma = medic_args()
    t = [t_l * 1e30 for t_l in t]
    losses = [ops.medic_clone_loss(t, s, g, mu, sigma, backend=b) for b in ("native", "reference")]
    assert all(bool(torch.isnan(loss)) for loss in losses), losses


@needs_kernels
def test_medic_double_backward_through_native_raises():
    t, s, g, mu, sigma = medic_args()
    loss = ops.medic_clone_loss(t, s, g, mu, sigma, backend="native")
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(loss, s, create_graph=True)
    # The reference supports it, and a plain backward through native is unaffected.
    loss_ref = ops.medic_clone_loss(t, s, g, mu, sigma, backend="reference")
    (grad_ref,) = torch.autograd.grad(loss_ref, s[0], create_graph=True)
    assert grad_ref.requires_grad
    ops.medic_clone_loss(t, s, g, mu, sigma, backend="native").backward()
    assert all(x.grad is not None for x in s)
