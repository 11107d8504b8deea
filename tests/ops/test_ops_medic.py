"""``medic_clone_loss``: the native CPU and CUDA kernels against a float64 evaluation of the
reference (inputs, tolerances and checks in ``medic_cases.py``), and the CUDA kernel against the
CPU kernel and against itself (the same inputs give the same bits twice).

The shapes aim at the kernels' edges: rows of one element, odd widths and unaligned storage
(the CUDA scalar path), rows of several tiles (the cross-block merge), channels_last, and more
layers than fit one CUDA launch, and channels-innermost layouts of any rank (token outputs).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bdfast
from bdfast import ops, reference
from bdfast.ops.medic_clone_loss import _same_kernel_layout
from support.devices import CUDA, CUDA_DEVICES, DEVICES, cpu_kernels, gpu_only
from support.medic_cases import (DTYPES, TOL, assert_matches_reference, make_layer, native, rel_err,
                                 unzip)

pytestmark = pytest.mark.skipif(not bdfast.backend_info()["native_cpu"],
                                reason="the compiled CPU kernels are not available")

# 4-D conv and 2-D linear layers with odd widths, and a layer of one sample of one element.
MIXED = [(4, 16, 8, 8), (4, 10), (4, 3, 5, 7), (4, 33), (1, 1)]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("signed", [False, True], ids=["abs", "signed"])
@pytest.mark.parametrize("tau", [0.0, 5.0, 50.0])
def test_mixed_layers_match_reference(device, dtype, signed, tau):
    layers = [make_layer(shape, dtype, device=device, seed=i) for i, shape in enumerate(MIXED)]
    assert_matches_reference(layers, TOL[dtype], tau=tau, signed=signed)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
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


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("signed", [False, True], ids=["abs", "signed"])
def test_single_element(device, signed):
    # One sample, one channel: both softmaxes are 1, so w = 1 and the loss is e^2.
    layers = [make_layer((1, 1), device=device)]
    loss, _ = assert_matches_reference(layers, 1e-5, signed=signed)
    t, s, _, _, sigma = layers[0]
    e = (t.double() - s.detach().double()) / (sigma.double() + 1e-5)
    assert float(loss) == pytest.approx(float(e.square().sum()), rel=1e-6)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [
    (2, 64, 32, 33),  # 67,584 elements per row: more than 65,536 and not a multiple of a chunk;
                      # on CUDA five tiles, the last one partial
    (1, 16, 32, 32),  # exactly one full CUDA tile
    (3, 16385),       # one element into a second CUDA tile
], ids=str)
def test_long_rows(device, dtype, shape):
    layers = [make_layer(shape, dtype, device=device),
              make_layer((shape[0], 7), dtype, device=device, seed=1)]
    assert_matches_reference(layers, TOL[dtype], tau=5.0)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("signed", [False, True], ids=["abs", "signed"])
def test_channels_last(device, dtype, signed):
    layers = [make_layer((3, 20, 6, 5), dtype, device=device, channels_last=True),
              make_layer((3, 530, 2, 2), dtype, device=device, seed=1, channels_last=True),
              make_layer((2, 64, 33, 33), dtype, device=device, seed=2,
                         channels_last=True),  # several CUDA tiles
              make_layer((3, 12), dtype, device=device, seed=3)]
    assert layers[0][0].is_contiguous(memory_format=torch.channels_last)
    assert not layers[0][0].is_contiguous()
    _, grads = assert_matches_reference(layers, TOL[dtype], tau=5.0, signed=signed)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)


# Channels innermost in any rank: token outputs [B, L, C] read as [B, C, L] (a position per
# sample, C = 1, odd widths, more than a 512-element CPU chunk of channels, a row of two CUDA
# tiles), 5-D maps, and a contiguous layer beside them.
INNERMOST = [(3, 20, 7), (2, 33, 1), (1, 1, 1), (4, 1, 9), (2, 600, 37), (2, 6, 3, 4, 5),
             (3, 5, 2, 1, 7)]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("signed", [False, True], ids=["abs", "signed"])
def test_channels_innermost_of_any_rank(device, dtype, signed):
    layers = [make_layer(shape, dtype, device=device, seed=i, innermost=True)
              for i, shape in enumerate(INNERMOST)]
    layers.append(make_layer((3, 12), dtype, device=device, seed=9))
    assert not layers[0][0].is_contiguous() and layers[0][0].stride() == (140, 1, 20)
    _, grads = assert_matches_reference(layers, TOL[dtype], tau=5.0, signed=signed)
    for (_, s, _, _, _), grad in zip(layers, grads):
        assert grad.stride() == s.stride()


class CountCopies(TorchDispatchMode):
    """Counts the copies torch makes while inside, and the strides the medic ops are given."""

    COPIES = (torch.ops.aten.clone.default, torch.ops.aten.copy_.default,
              torch.ops.aten._to_copy.default)

    def __init__(self):
        super().__init__()
        self.copies, self.op_strides = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.COPIES:
            self.copies += 1
        if func._schema.name.startswith("bdfast::medic_clone_loss"):
            self.op_strides.append([x.stride() for x in args[2]])  # s
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_token_and_channels_last_outputs_are_read_in_place(device):
    # What MEDIC hands the op: y.movedim(-1, 1) views of contiguous [B, L, C] and [B, H, W, C]
    # outputs of a Linear layer.
    views = []
    for i, shape in enumerate([(4, 197, 24), (2, 5, 6, 16)]):
        t, s, g, mu, sigma = make_layer(shape[:1] + shape[-1:] + shape[1:-1], device=device,
                                        seed=i, innermost=True)
        y = s.detach().movedim(1, -1).contiguous().requires_grad_()  # the student's output
        views.append((t, y.movedim(-1, 1), g, mu, sigma))
    t, s, g, mu, sigma = unzip(views)
    with CountCopies() as counted:
        loss = ops.medic_clone_loss(t, s, g, mu, sigma, backend="native")
        grads = torch.autograd.grad(loss, s)
    assert counted.copies == 0
    assert counted.op_strides == [[x.stride() for x in s]] * 2  # forward and backward
    assert [gr.stride() for gr in grads] == [x.stride() for x in s]


def _laid_out(x, layout):
    """x [B, C, L] contiguous, channels innermost, or transposed: a [B, C, L] view of an
    [L, B, C] tensor, whose samples interleave (nn.MultiheadAttention's output is one)."""
    order = {"contiguous": (0, 1, 2), "innermost": (0, 2, 1), "transposed": (2, 0, 1)}[layout]
    inverse = [order.index(d) for d in range(3)]
    return x.detach().permute(*order).contiguous().permute(*inverse)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("student, gradient, copies", [
    ("innermost", "transposed", 1),   # a ViT LayerNorm's output feeding attention
    ("contiguous", "innermost", 1),   # a conv output under a channels-last gradient
    ("innermost", "contiguous", 2),   # one of them contiguous: all three contiguous, as before
    ("transposed", "innermost", 2),   # an attention output
])
def test_only_tensors_out_of_layout_are_copied(device, student, gradient, copies):
    t, s, g, mu, sigma = make_layer((3, 24, 37), device=device)
    t, s, g = _laid_out(t, student), _laid_out(s, student).requires_grad_(), _laid_out(g, gradient)
    assert not _same_kernel_layout(t, s, g)
    with CountCopies() as counted:
        loss = ops.medic_clone_loss([t], [s], [g], [mu], [sigma], backend="native")
        (grad,) = torch.autograd.grad(loss, [s])
    assert counted.copies == copies
    if copies == 1:  # s was read in place
        assert grad.stride() == s.stride()
    assert_matches_reference([(t, s, g, mu, sigma)], TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_mixed_dtypes_across_layers(device):
    layers = [make_layer((3, 8, 4, 4), torch.float16, device=device),
              make_layer((3, 5, 3, 3), torch.bfloat16, device=device, seed=1),
              make_layer((3, 9), torch.float32, device=device, seed=2)]
    assert_matches_reference(layers, 1e-2, tau=5.0)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_mixed_dtypes_within_a_layer_are_promoted(device):
    t, s, g, mu, sigma = make_layer((3, 6, 4, 4), device=device)
    layer = (t.half(), s.detach().bfloat16().requires_grad_(), g, mu, sigma)
    _, (grad,) = assert_matches_reference([layer], 1e-2, tau=5.0)
    assert grad.dtype == torch.bfloat16  # the gradient comes back in the student's dtype


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("signed", [False, True], ids=["abs", "signed"])
def test_dead_channels(device, signed):
    # sigma = 0: sig = eps, so the clone error of a dead channel is scaled by 1 / eps.
    layers = [make_layer((4, 6, 5, 5), device=device, dead=(1, 4)),
              make_layer((4, 9), device=device, seed=1, dead=(0,))]
    loss, grads = assert_matches_reference(layers, 1e-4, tau=5.0, signed=signed)
    assert torch.isfinite(loss) and all(torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
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


@pytest.mark.parametrize("device", DEVICES, indirect=True)
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


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_gradient_scales_with_upstream_gradient(device):
    # On CUDA, grad_loss is read on the device by the backward kernel.
    layers = [make_layer((3, 4, 3, 3), device=device), make_layer((3, 6), seed=1, device=device)]
    t, s, g, mu, sigma = unzip(layers)
    loss = ops.medic_clone_loss(t, s, g, mu, sigma, backend="native")
    once = torch.autograd.grad(loss, s, retain_graph=True)
    scaled = torch.autograd.grad(loss * -2.5, s)
    for a, b in zip(once, scaled):
        assert torch.allclose(b, -2.5 * a, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# The CUDA kernel alone: the cross-block merge of a row's tiles, the scalar path, launch groups,
# agreement with the CPU kernel, determinism and CUDA graph capture.

# Not float16: weights of ~2e-6 give gradients below float16's normal range, whose rounding
# alone exceeds the 1e-2 tolerance (bfloat16 keeps float32's exponent range).
@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_row_of_many_tiles(device, dtype):
    # 524,288 elements: 32 tiles merged by the row's last block.
    layers = [make_layer((1, 8, 256, 256), dtype, device=device),
              make_layer((1, 7), dtype, seed=1, device=device)]
    assert_matches_reference(layers, TOL[dtype], tau=5.0)


@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_misaligned_storage(device, dtype, channels_last):
    layers = [make_layer((3, 8, 6, 6), dtype, device=device, misaligned=True,
                         channels_last=channels_last),
              make_layer((2, 64, 16, 17), dtype, seed=1, device=device, misaligned=True),
              make_layer((3, 8, 4, 4), dtype, seed=2, device=device)]
    assert layers[0][0].data_ptr() % 16 != 0
    assert_matches_reference(layers, TOL[dtype], tau=5.0)


@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
def test_cuda_more_layers_than_one_launch_holds(device):
    # 400 layers exceed the 384 descriptors of one launch: the second launch must share the
    # arrival counters and the loss.
    layers = [make_layer((2, 3 + i % 5, 2, 2) if i % 3 else (2, 1 + i % 7), seed=i,
                         device=device) for i in range(400)]
    # A multi-tile row in the first launch and one in the second.
    layers[7] = make_layer((2, 64, 32, 32), seed=7, device=device)
    layers[390] = make_layer((1, 64, 32, 33), seed=390, device=device)
    assert_matches_reference(layers, 1e-4, tau=5.0)


@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_matches_cpu_kernel(device, dtype, channels_last):
    shapes = [(3, 16, 9, 9), (3, 64, 32, 33), (3, 5, 1, 1), (3, 17, 2, 3)]
    layers = [make_layer(shape, dtype, seed=i, channels_last=channels_last, device=device)
              for i, shape in enumerate(shapes)]
    layers.append(make_layer((3, 10), dtype, seed=9, device=device))
    t, s, g, mu, sigma = unzip(layers)
    loss, grads = native(t, s, g, mu, sigma, tau=5.0)
    cpu = [[x.detach().cpu() for x in part] for part in (t, s, g, mu, sigma)]
    with cpu_kernels():
        loss_cpu, grads_cpu = native(*cpu, tau=5.0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(loss, loss_cpu) < tol
    for gr, ref in zip(grads, grads_cpu):
        assert rel_err(gr, ref) < tol
    # The row statistics the backward consumes agree too.
    _, stats = torch.ops.bdfast.medic_clone_loss(t, s, g, mu, sigma, 5.0, 1e-5, False)
    with cpu_kernels():
        _, stats_cpu = torch.ops.bdfast.medic_clone_loss(*cpu, 5.0, 1e-5, False)
    assert rel_err(stats, stats_cpu) < 1e-5


@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_non_finite_inputs_match_cpu_kernel(device, bad, channels_last):
    # A non-finite teacher value, gradient and student value, each in one row (the second one of
    # two tiles): the loss is NaN, and exactly the gradients the CPU kernel makes non-finite are.
    layers = [make_layer((3, 6, 5, 5), device=device, channels_last=channels_last),
              make_layer((3, 70, 16, 16), seed=1, device=device, channels_last=channels_last),
              make_layer((3, 9), seed=2, device=device)]
    with torch.no_grad():
        layers[0][0][1, 2, 0, 0] = bad
        layers[1][2][0, 69, 15, 15] = bad
        layers[2][1][2, 4] = bad
    t, s, g, mu, sigma = unzip(layers)
    loss, grads = native(t, s, g, mu, sigma, tau=5.0)
    with cpu_kernels():
        loss_cpu, grads_cpu = native(t, s, g, mu, sigma, tau=5.0)
    assert torch.isnan(loss) and torch.isnan(loss_cpu)
    for gr, ref in zip(grads, grads_cpu):
        assert torch.equal(gr.isfinite(), ref.isfinite())
        assert rel_err(gr.nan_to_num(0, 0, 0), ref.nan_to_num(0, 0, 0)) < 1e-5
        assert gr.isfinite().any()


@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
def test_cuda_is_deterministic(device):
    # Rows of 4 and of 8 tiles: whichever block of a row arrives last, the row's statistics (and
    # so the loss and the gradients) have the same bits.
    layers = [make_layer((4, 64, 32, 32), torch.bfloat16, device=device),
              make_layer((4, 32, 16, 16), torch.bfloat16, seed=1, device=device,
                         channels_last=True),
              make_layer((4, 10), torch.bfloat16, seed=2, device=device),
              make_layer((3, 8, 128, 128), seed=3, device=device)]
    t, s, g, mu, sigma = unzip(layers)
    first = native(t, s, g, mu, sigma, tau=5.0)
    _, first_stats = torch.ops.bdfast.medic_clone_loss(t, s, g, mu, sigma, 5.0, 1e-5, False)
    for _ in range(3):
        again = native(t, s, g, mu, sigma, tau=5.0)
        assert torch.equal(first[0], again[0])
        assert all(torch.equal(a, b) for a, b in zip(first[1], again[1]))
        _, stats = torch.ops.bdfast.medic_clone_loss(t, s, g, mu, sigma, 5.0, 1e-5, False)
        assert torch.equal(first_stats, stats)


@gpu_only
def test_cuda_under_graph_capture():
    # No host synchronisation and no host-side state: a captured forward + backward replays
    # on new student values and gives exactly what an eager call gives.
    layers = [make_layer((4, 16, 32, 32), device=CUDA),
              make_layer((4, 8, 5, 5), torch.bfloat16, seed=1, device=CUDA),
              make_layer((4, 10), seed=2, device=CUDA)]
    t, s, g, mu, sigma = unzip(layers)
    s_static = [x.detach().clone() for x in s]
    upstream = torch.ones((), device=CUDA)
    args = (5.0, 1e-5, False)

    def step():
        loss, stats = torch.ops.bdfast.medic_clone_loss(t, s_static, g, mu, sigma, *args)
        grads = torch.ops.bdfast.medic_clone_loss_backward(upstream, t, s_static, g, mu, sigma,
                                                           stats, *args)
        return loss, grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture, as torch.cuda.graph requires
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss, captured_grads = step()
    for x, seed in zip(s_static, range(3)):
        x.copy_(x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
                .to(x.device, x.dtype))
    graph.replay()
    torch.cuda.synchronize()
    eager_loss, eager_grads = step()
    assert torch.equal(captured_loss, eager_loss)
    assert all(torch.equal(a, b) for a, b in zip(captured_grads, eager_grads))


# ---------------------------------------------------------------------------------------------
# The CPU kernel's instruction sets

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
                          "-k", "cpu and not instruction_set and not cuda"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:]
