"""``medic_clone_loss``: the native CPU kernel against a float64 evaluation of the reference
(inputs, tolerances and checks in ``medic_cases.py``, shared with the CUDA tests)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import bdfast
from bdfast import ops, reference
from medic_cases import DTYPES, TOL, assert_matches_reference, make_layer, rel_err, unzip

pytestmark = pytest.mark.skipif(not bdfast.backend_info()["native_cpu"],
                                reason="the compiled CPU kernels are not available")

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])]


MIXED = [(4, 16, 8, 8), (4, 10), (4, 3, 5, 7), (4, 33)]  # 4-D conv and 2-D linear, odd widths


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("signed", [False, True], ids=["abs", "signed"])
@pytest.mark.parametrize("tau", [0.0, 5.0, 50.0])
def test_mixed_layers_match_reference(device, dtype, signed, tau):
    layers = [make_layer(shape, dtype, device=device, seed=i) for i, shape in enumerate(MIXED)]
    assert_matches_reference(layers, TOL[dtype], tau=tau, signed=signed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_random_shapes(device, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    batch = int(torch.randint(1, 6, (), generator=gen))
    layers = []
    for i in range(int(torch.randint(1, 5, (), generator=gen))):
        dims = torch.randint(1, 12, (3,), generator=gen).tolist()
        shape = (batch, *dims) if torch.rand((), generator=gen) < 0.6 else (batch, dims[0])
        layers.append(make_layer(shape, device=device, seed=seed * 10 + i))
    assert_matches_reference(layers, TOL[torch.float32], tau=5.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("signed", [False, True], ids=["abs", "signed"])
def test_single_element(device, signed):
    # One sample, one channel: both softmaxes are 1, so w = 1 and the loss is e^2.
    layers = [make_layer((1, 1), device=device)]
    loss, _ = assert_matches_reference(layers, 1e-5, signed=signed)
    t, s, _, _, sigma = layers[0]
    e = (t.double() - s.detach().double()) / (sigma.double() + 1e-5)
    assert float(loss) == pytest.approx(float(e.square().sum()), rel=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_rows(device, dtype):
    # 64 * 32 * 33 = 67,584 elements per row: more than 65,536 and not a multiple of a chunk.
    layers = [make_layer((2, 64, 32, 33), dtype, device=device), make_layer((2, 7), dtype,
                                                                            device=device, seed=1)]
    assert_matches_reference(layers, TOL[dtype], tau=5.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last(device, dtype):
    layers = [make_layer((3, 20, 6, 5), dtype, device=device, channels_last=True),
              make_layer((3, 530, 2, 2), dtype, device=device, seed=1, channels_last=True),
              make_layer((3, 12), dtype, device=device, seed=2)]
    assert layers[0][0].is_contiguous(memory_format=torch.channels_last)
    assert not layers[0][0].is_contiguous()
    _, grads = assert_matches_reference(layers, TOL[dtype], tau=5.0)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_across_layers(device):
    layers = [make_layer((3, 8, 4, 4), torch.float16, device=device),
              make_layer((3, 5, 3, 3), torch.bfloat16, device=device, seed=1),
              make_layer((3, 9), torch.float32, device=device, seed=2)]
    assert_matches_reference(layers, 1e-2, tau=5.0)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_within_a_layer_are_promoted(device):
    t, s, g, mu, sigma = make_layer((3, 6, 4, 4), device=device)
    layer = (t.half(), s.detach().bfloat16().requires_grad_(), g, mu, sigma)
    _, (grad,) = assert_matches_reference([layer], 1e-2, tau=5.0)
    assert grad.dtype == torch.bfloat16  # the gradient comes back in the student's dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("signed", [False, True], ids=["abs", "signed"])
def test_dead_channels(device, signed):
    # sigma = 0: sig = eps, so the clone error of a dead channel is scaled by 1 / eps.
    layers = [make_layer((4, 6, 5, 5), device=device, dead=(1, 4)),
              make_layer((4, 9), device=device, seed=1, dead=(0,))]
    loss, grads = assert_matches_reference(layers, 1e-4, tau=5.0, signed=signed)
    assert torch.isfinite(loss) and all(torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize("device", DEVICES)
def test_return_weights(device):
    layers = [make_layer((3, 4, 5, 5), device=device), make_layer((3, 11), device=device, seed=1)]
    t, s, g, mu, sigma = unzip(layers)
    loss, weights = ops.medic_clone_loss(t, s, g, mu, sigma, backend="native",
                                         return_weights=True)
    assert len(weights) == 2
    recomputed = torch.zeros((), dtype=torch.float64)
    for t_l, s_l, w_l, sigma_l in zip(t, s, weights, sigma):
        assert w_l.shape == t_l.shape
        # w = sqrt(a p) with a, p softmaxes: positive, and each row sums to at most 1.
        rows = w_l.reshape(w_l.shape[0], -1).double()
        assert (rows > 0).all() and (rows.sum(1) <= 1 + 1e-6).all()
        e = (t_l.double() - s_l.detach().double()) / (sigma_l.double().view(1, -1, *[1] * (
            t_l.dim() - 2)) + 1e-5)
        recomputed += (w_l.double() * e.square()).sum() / t_l.shape[0]
    # The kernel never materialises w; the weights it returns must give its own loss.
    assert rel_err(loss, recomputed) < 1e-5
    loss.backward()
    assert all(x.grad is not None for x in s)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_no_gradient_to_teacher_inputs(device, backend):
    t, s, g, mu, sigma = make_layer((2, 3, 4, 4), device=device)
    t, g, mu, sigma = (x.clone().requires_grad_() for x in (t, g, mu, sigma))
    loss = ops.medic_clone_loss([t], [s], [g], [mu], [sigma], backend=backend)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None and g.grad is None and mu.grad is None and sigma.grad is None


def test_auto_backend_uses_the_kernel_and_agrees():
    layers = [make_layer((2, 5, 3, 3)), make_layer((2, 4), seed=1)]
    t, s, g, mu, sigma = unzip(layers)
    with torch.no_grad():
        auto = ops.medic_clone_loss(t, s, g, mu, sigma)
        nat = ops.medic_clone_loss(t, s, g, mu, sigma, backend="native")
        ref = ops.medic_clone_loss(t, s, g, mu, sigma, backend="reference")
    assert float(auto) == float(nat)
    assert rel_err(nat, ref) < 1e-5


@pytest.mark.parametrize("signed", [False, True], ids=["abs", "signed"])
def test_reference_gradcheck(signed):
    # The reference's autograd (through softmaxes treated as constants) in float64.
    layers = [make_layer((2, 3, 2, 2), torch.float64), make_layer((2, 5), torch.float64, seed=1)]
    t, s, g, mu, sigma = unzip(layers)
    mu, sigma = [m.double() for m in mu], [v.double() for v in sigma]

    def loss_of(*students):
        return reference.medic_clone_loss(t, list(students), g, mu, sigma, tau=5.0,
                                          signed=signed)

    assert torch.autograd.gradcheck(loss_of, tuple(s), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_scales_with_upstream_gradient(device):
    # On CUDA, grad_loss is read on the device by the backward kernel.
    layers = [make_layer((3, 4, 3, 3), device=device), make_layer((3, 6), seed=1, device=device)]
    t, s, g, mu, sigma = unzip(layers)
    loss = ops.medic_clone_loss(t, s, g, mu, sigma, backend="native")
    once = torch.autograd.grad(loss, s, retain_graph=True)
    scaled = torch.autograd.grad(loss * -2.5, s)
    for a, b in zip(once, scaled):
        assert torch.allclose(b, -2.5 * a, rtol=1e-5, atol=0)


ISAS = ["generic", "avx2", "avx512"]


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_instruction_set_matches_reference(isa):
    """The row kernels are compiled once per instruction set and the widest one the CPU has
    runs; BDFAST_CPU_ISA caps it, so this runs the CPU parity tests above with each copy."""
    best = bdfast.backend_info()["cpu_isa"]
    if ISAS.index(isa) > ISAS.index(best):
        pytest.skip(f"this CPU runs the {best} kernels at most")
    env = {**os.environ, "BDFAST_CPU_ISA": isa}
    used = subprocess.run([sys.executable, "-c", "import bdfast; "
                           "print(bdfast.backend_info()['cpu_isa'])"],
                          env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert used == isa
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "cpu and not instruction_set"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:]
