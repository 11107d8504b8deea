"""The CUDA kernels: parity with a float64 evaluation of the reference, with the CPU kernels, and
with themselves (the same inputs give the same bits twice).

SPEC §2 tolerances, as relative errors of the whole output: < 1e-4 for float32
``medic_clone_loss`` (< 1e-5 for the other ops) and < 1e-2 for 16-bit inputs, whose reference
is evaluated in float64 on the same rounded values. The shapes aim at the kernels' edges: rows of
one element, odd widths and unaligned storage (the scalar path), rows of several tiles (the
cross-block merge), channels_last, more layers than fit one launch, and histogram columns whose
bins need several shared-memory passes.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

import bdfast
from bdfast import ops, reference

import medic_cases
from histogram_cases import activations, compare, released_loop
from medic_cases import DTYPES, TOL, assert_matches_reference, native, rel_err, unzip

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not bdfast.backend_info()["native_cuda"],
                       reason="the extension was built without CUDA kernels"),
]

CUDA = "cuda"
make_layer = functools.partial(medic_cases.make_layer, device=CUDA)


MIXED = [(4, 16, 8, 8), (4, 10), (4, 3, 5, 7), (4, 33), (1, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("signed", [False, True], ids=["abs", "signed"])
@pytest.mark.parametrize("tau", [0.0, 5.0, 50.0])
def test_medic_mixed_layers(dtype, signed, tau):
    layers = [make_layer(shape, dtype, seed=i) for i, shape in enumerate(MIXED)]
    assert_matches_reference(layers, TOL[dtype], tau=tau, signed=signed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [
    (2, 64, 32, 33),   # 67,584 elements per row: five tiles, the last one partial
    (1, 16, 32, 32),   # exactly one full tile
    (3, 16385),        # one element into a second tile
], ids=str)
def test_medic_long_rows(dtype, shape):
    layers = [make_layer(shape, dtype), make_layer((shape[0], 7), dtype, seed=1)]
    assert_matches_reference(layers, TOL[dtype], tau=5.0)


# Not float16: weights of ~2e-6 give gradients below float16's normal range, whose rounding
# alone exceeds the 1e-2 tolerance (bfloat16 keeps float32's exponent range).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_medic_row_of_many_tiles(dtype):
    # 524,288 elements: 32 tiles merged by the row's last block.
    layers = [make_layer((1, 8, 256, 256), dtype), make_layer((1, 7), dtype, seed=1)]
    assert_matches_reference(layers, TOL[dtype], tau=5.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("signed", [False, True], ids=["abs", "signed"])
def test_medic_channels_last(dtype, signed):
    layers = [make_layer((3, 20, 6, 5), dtype, channels_last=True),
              make_layer((3, 530, 2, 2), dtype, seed=1, channels_last=True),
              make_layer((2, 64, 33, 33), dtype, seed=2, channels_last=True),  # several tiles
              make_layer((3, 12), dtype, seed=3)]
    assert not layers[0][0].is_contiguous()
    _, grads = assert_matches_reference(layers, TOL[dtype], tau=5.0, signed=signed)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_medic_misaligned_storage(dtype, channels_last):
    layers = [make_layer((3, 8, 6, 6), dtype, misaligned=True, channels_last=channels_last),
              make_layer((2, 64, 16, 17), dtype, seed=1, misaligned=True),
              make_layer((3, 8, 4, 4), dtype, seed=2)]
    assert layers[0][0].data_ptr() % 16 != 0
    assert_matches_reference(layers, TOL[dtype], tau=5.0)


@pytest.mark.parametrize("signed", [False, True], ids=["abs", "signed"])
def test_medic_dead_channels(signed):
    layers = [make_layer((4, 6, 5, 5), dead=(1, 4)), make_layer((4, 9), seed=1, dead=(0,))]
    loss, grads = assert_matches_reference(layers, 1e-4, tau=5.0, signed=signed)
    assert torch.isfinite(loss) and all(torch.isfinite(gr).all() for gr in grads)


def test_medic_more_layers_than_one_launch_holds():
    # 400 layers exceed the 384 descriptors of one launch: the second launch must share the
    # arrival counters and the loss.
    layers = [make_layer((2, 3 + i % 5, 2, 2) if i % 3 else (2, 1 + i % 7), seed=i)
              for i in range(400)]
    layers[7] = make_layer((2, 64, 32, 32), seed=7)  # a multi-tile row in the first launch
    layers[390] = make_layer((1, 64, 32, 33), seed=390)  # and in the second
    assert_matches_reference(layers, 1e-4, tau=5.0)


def test_medic_mixed_dtypes_across_layers():
    layers = [make_layer((3, 8, 4, 4), torch.float16),
              make_layer((3, 5, 3, 3), torch.bfloat16, seed=1),
              make_layer((3, 9), torch.float32, seed=2)]
    assert_matches_reference(layers, 1e-2, tau=5.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_medic_cuda_matches_cpu_kernel(dtype, channels_last):
    shapes = [(3, 16, 9, 9), (3, 64, 32, 33), (3, 5, 1, 1), (3, 17, 2, 3)]
    layers = [make_layer(shape, dtype, seed=i, channels_last=channels_last)
              for i, shape in enumerate(shapes)] + [make_layer((3, 10), dtype, seed=9)]
    t, s, g, mu, sigma = unzip(layers)
    loss, grads = native(t, s, g, mu, sigma, tau=5.0)
    cpu = [[x.detach().cpu() for x in part] for part in (t, s, g, mu, sigma)]
    loss_cpu, grads_cpu = native(*cpu, tau=5.0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(loss, loss_cpu) < tol
    for gr, ref in zip(grads, grads_cpu):
        assert rel_err(gr, ref) < tol
    # The row statistics the backward consumes agree too.
    _, stats = torch.ops.bdfast.medic_clone_loss(t, s, g, mu, sigma, 5.0, 1e-5, False)
    _, stats_cpu = torch.ops.bdfast.medic_clone_loss(*cpu, 5.0, 1e-5, False)
    assert rel_err(stats, stats_cpu) < 1e-5


def test_medic_is_deterministic():
    layers = [make_layer((4, 64, 32, 32), torch.bfloat16),
              make_layer((4, 32, 16, 16), torch.bfloat16, seed=1, channels_last=True),
              make_layer((4, 10), torch.bfloat16, seed=2)]
    t, s, g, mu, sigma = unzip(layers)
    first = native(t, s, g, mu, sigma, tau=5.0)
    for _ in range(3):
        again = native(t, s, g, mu, sigma, tau=5.0)
        assert torch.equal(first[0], again[0])
        assert all(torch.equal(a, b) for a, b in zip(first[1], again[1]))


def test_medic_under_cuda_graph_capture():
    # No host synchronisation and no host-side state: a captured forward + backward replays
    # on new student values and gives exactly what an eager call gives.
    layers = [make_layer((4, 16, 32, 32)), make_layer((4, 8, 5, 5), torch.bfloat16, seed=1),
              make_layer((4, 10), seed=2)]
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


def test_medic_rejects_inputs_on_two_devices():
    t, s, g, mu, sigma = make_layer((2, 3, 4, 4))
    with pytest.raises(RuntimeError, match="same CUDA device"):
        torch.ops.bdfast.medic_clone_loss([t], [s], [g], [mu.cpu()], [sigma], 5.0, 1e-5, False)


# ---------------------------------------------------------------------------------------------
# histogram_entropy

HIST_SHAPES = [  # (N, K, offsets)
    (2, 3, [0, 3]),
    (50, 1, [0, 1]),
    (300, 40, [0, 40]),
    (257, 37, [0, 5, 5, 18, 37]),  # uneven layers and an empty one
    (1100, 70, [0, 1, 33, 70]),    # more samples than threads per block
]


@pytest.mark.parametrize("n,k,offsets", HIST_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_histogram_default_matches_float64_reference(n, k, offsets, dtype):
    x = activations(n, k, seed=n + k, dtype=dtype)
    out = ops.histogram_entropy(x.to(CUDA), torch.tensor(offsets), backend="native")
    assert out.device.type == "cuda" and out.dtype == torch.float32 and out.shape == (k,)
    ref = reference.histogram_entropy(x.double(), torch.tensor(offsets))
    assert compare(out, ref) < 1e-5


@pytest.mark.parametrize("step", [1.5, 0.1, 1e-4], ids=str)
def test_histogram_default_many_bins(step):
    # 1e-4 over 3,000 samples needs up to ~10^5 bins: several shared-memory passes.
    x = activations(3000, 6, seed=4)
    out = ops.histogram_entropy(x.to(CUDA), step=step, backend="native")
    assert compare(out, reference.histogram_entropy(x.double(), step=step)) < 1e-5


def test_histogram_default_sparse_bins():
    # step 1e-6: ten million bins, every sample alone in its own, far apart; the passes skip
    # the empty stretches. h = ln N + ln step exactly.
    x = activations(60, 3, seed=4)
    out = ops.histogram_entropy(x.to(CUDA), step=1e-6, backend="native")
    assert compare(out, [math.log(60) + math.log(1e-6)] * 3) < 1e-5
    assert compare(out, ops.histogram_entropy(x, step=1e-6, backend="native")) < 1e-6


@pytest.mark.parametrize("n,k,offsets", HIST_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_histogram_compat_matches_released_loop(n, k, offsets, dtype):
    x = activations(n, k, seed=7 * n + k, dtype=dtype)
    out = ops.histogram_entropy(x.to(CUDA), torch.tensor(offsets), step=0.05,
                                reference_compat=True, backend="native")
    assert compare(out, released_loop(x, offsets, 0.05)) < 1e-5


def test_histogram_compat_at_the_default_step_with_several_passes():
    x = activations(2000, 12, seed=11)
    offsets = [0, 4, 12]
    out = ops.histogram_entropy(x.to(CUDA), torch.tensor(offsets), reference_compat=True,
                                backend="native")
    assert compare(out, released_loop(x, offsets, 0.01)) < 1e-5
    fine = ops.histogram_entropy(x.to(CUDA), torch.tensor(offsets), step=2e-4,
                                 reference_compat=True, backend="native")
    cpu = ops.histogram_entropy(x, torch.tensor(offsets), step=2e-4, reference_compat=True,
                                backend="native")
    assert compare(fine, cpu) < 1e-6


@pytest.mark.parametrize("compat", [False, True], ids=["default", "compat"])
def test_histogram_constant_and_non_finite_columns(compat):
    x = activations(100, 8, seed=5)
    x[:, 1] = 3.25
    x[17, 2] = float("nan")
    x[3, 4] = float("inf")
    x[:, 6] = 0.0
    offsets = [0, 5, 8]
    out = ops.histogram_entropy(x.to(CUDA), torch.tensor(offsets), reference_compat=compat,
                                backend="native")
    assert torch.isnan(out[[1, 2, 4, 6]]).all() and torch.isfinite(out[[0, 3, 5, 7]]).all()
    ref = (released_loop(x, offsets, 0.01) if compat
           else reference.histogram_entropy(x.double(), torch.tensor(offsets)))
    assert compare(out, ref) < 1e-5


@pytest.mark.parametrize("compat", [False, True], ids=["default", "compat"])
def test_histogram_layer_without_valid_columns(compat):
    x = activations(30, 6, seed=6)
    x[:, :3] = 1.0
    out = ops.histogram_entropy(x.to(CUDA), torch.tensor([0, 3, 6]), reference_compat=compat,
                                backend="native")
    assert torch.isnan(out[:3]).all() and torch.isfinite(out[3:]).all()


def test_histogram_values_on_edges():
    # Three samples -1, 0, 1 per column (sd 1): compat drops edge values and the partial bin.
    x = torch.tensor([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]], device=CUDA)
    compat = ops.histogram_entropy(x, step=0.25, reference_compat=True, backend="native")
    assert compat.tolist() == [0.0, 0.0]
    compat = ops.histogram_entropy(x, step=0.3, reference_compat=True, backend="native")
    assert compare(compat, [math.log(3) / 3] * 2) < 1e-6
    default = ops.histogram_entropy(x, step=0.25, backend="native")
    assert compare(default, [-math.log(4 / 3)] * 2) < 1e-6


@pytest.mark.parametrize("compat", [False, True], ids=["default", "compat"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_histogram_cuda_matches_cpu_kernel(compat, dtype):
    x = activations(500, 300, seed=13, dtype=dtype)
    x[:, 7] = 2.0
    offsets = torch.tensor([0, 64, 64, 192, 300])
    out = ops.histogram_entropy(x.to(CUDA), offsets, reference_compat=compat, backend="native")
    cpu = ops.histogram_entropy(x, offsets, reference_compat=compat, backend="native")
    assert compare(out, cpu) < 1e-6


def test_histogram_is_deterministic():
    x = activations(500, 256, seed=14).to(CUDA)
    offsets = torch.tensor([0, 100, 256])
    for compat in (False, True):
        first = ops.histogram_entropy(x, offsets, reference_compat=compat, backend="native")
        again = ops.histogram_entropy(x, offsets, reference_compat=compat, backend="native")
        assert torch.equal(first.isnan(), again.isnan())
        assert torch.equal(first.nan_to_num(), again.nan_to_num())


def test_histogram_compat_under_cuda_graph_capture():
    # The layer grid is reduced on the device: capture works and replays on new data.
    x = activations(200, 48, seed=15).to(CUDA)
    offsets = torch.tensor([0, 16, 48], device=CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.bdfast.histogram_entropy(x, offsets, 0.01, True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.bdfast.histogram_entropy(x, offsets, 0.01, True)
    x.copy_(activations(200, 48, seed=16).to(CUDA))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, torch.ops.bdfast.histogram_entropy(x, offsets, 0.01, True))


# ---------------------------------------------------------------------------------------------
# gaussian_kl

def bn_statistics(k, *, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    mu_q = torch.randn(k, generator=gen)
    var_q = 0.1 + torch.rand(k, generator=gen)
    mu_p = mu_q + 0.1 * torch.randn(k, generator=gen)
    var_p = var_q * (1 + 0.2 * torch.randn(k, generator=gen)).abs()
    mu_p[::17] += 3.0
    return [v.to(dtype) for v in (mu_p, var_p, mu_q, var_q)]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("k", [1, 7, 4800, 1_100_003])  # the last one exceeds the grid
def test_gaussian_kl_matches_float64_reference(dtype, k):
    stats = bn_statistics(k, seed=k % 1000, dtype=dtype)
    out = ops.gaussian_kl(*(v.to(CUDA) for v in stats), backend="native")
    assert out.device.type == "cuda" and out.dtype == torch.float32 and out.shape == (k,)
    ref = reference.gaussian_kl(*(v.double() for v in stats))
    assert rel_err(out, ref) < (1e-5 if dtype in (torch.float32, torch.float64) else 1e-2)


def test_gaussian_kl_floors_mixes_dtypes_and_propagates_nan():
    mu_p, var_p, mu_q, var_q = bn_statistics(64, seed=1)
    var_p[:4] = torch.tensor([0.0, -1.0, 1e-9, 1e-5])
    var_q[4:6] = 0.0
    mu_p[10] = float("nan")
    var_q[11] = float("nan")
    inputs = (mu_p.half(), var_p, mu_q.bfloat16(), var_q.double())
    out = ops.gaussian_kl(*(v.to(CUDA) for v in inputs), backend="native")
    cpu = ops.gaussian_kl(*inputs, backend="native")
    ref = reference.gaussian_kl(*(v.double() for v in inputs))
    assert torch.equal(out.isnan().cpu(), ref.isnan()) and out[10].isnan() and out[11].isnan()
    finite = ~ref.isnan()
    assert rel_err(out.cpu()[finite], ref[finite]) < 1e-5
    assert rel_err(out.cpu()[finite], cpu[finite]) < 1e-6


# ---------------------------------------------------------------------------------------------
# layer_outliers

def packed_scores(sizes, *, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.cat([torch.randn(n, generator=gen) * (1 + i) + 3 * i
                        for i, n in enumerate(sizes)])
    if scores.numel() > 10:
        scores[3] -= 25.0
        scores[-10] += 25.0
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    return scores.to(dtype), offsets


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("direction", ["low", "high"])
@pytest.mark.parametrize("u", [0.5, 3.0])
def test_layer_outliers_match_reference_and_cpu(dtype, direction, u):
    scores, offsets = packed_scores([40, 3, 64, 5000, 7, 1], seed=int(u * 10), dtype=dtype)
    offsets = torch.tensor(offsets)
    out = ops.layer_outliers(scores.to(CUDA), offsets, u=u, direction=direction,
                             backend="native")
    assert out.device.type == "cuda" and out.dtype == torch.bool
    ref = reference.layer_outliers(scores, offsets, u=u, direction=direction)
    assert torch.equal(out.cpu(), ref)
    assert torch.equal(out.cpu(), ops.layer_outliers(scores, offsets, u=u, direction=direction,
                                                     backend="native"))


def test_layer_outliers_nan_inf_and_small_layers():
    scores, offsets = packed_scores([30, 1, 2, 5, 0, 20], seed=3)
    scores[0] = float("nan")
    scores[1] = -float("inf")
    scores[31:33] = torch.tensor([float("nan"), 5.0])
    scores[33:38] = float("nan")
    offsets = torch.tensor(offsets)
    for direction in ("low", "high"):
        out = ops.layer_outliers(scores.to(CUDA), offsets, u=1.0, direction=direction,
                                 backend="native")
        assert torch.equal(out.cpu(), reference.layer_outliers(scores, offsets, u=1.0,
                                                               direction=direction))
        assert not out[0] and not out[30:38].any()
        assert bool(out[1]) == (direction == "low")


def test_small_ops_are_deterministic():
    scores, offsets = packed_scores([4000, 300, 77], seed=5)
    scores, offsets = scores.to(CUDA), torch.tensor(offsets, device=CUDA)
    first = torch.ops.bdfast.layer_outliers(scores, offsets, 2.0, False)
    assert torch.equal(first, torch.ops.bdfast.layer_outliers(scores, offsets, 2.0, False))
    stats = [v.to(CUDA) for v in bn_statistics(5000, seed=6)]
    assert torch.equal(torch.ops.bdfast.gaussian_kl(*stats, 1e-5),
                       torch.ops.bdfast.gaussian_kl(*stats, 1e-5))


@pytest.mark.parametrize("offsets", [[0, 50, 10, 64], [0, 70], [1, 64]])
def test_kernels_check_offsets_themselves(offsets):
    # The Python wrapper's check is skipped under torch.compile; the ops check on their own.
    bad = torch.tensor(offsets, device=CUDA)
    with pytest.raises(RuntimeError, match="layer_outliers: offsets must start at 0"):
        torch.ops.bdfast.layer_outliers(torch.randn(64, device=CUDA), bad, 3.0, False)
    with pytest.raises(RuntimeError, match="histogram_entropy: offsets must start at 0"):
        torch.ops.bdfast.histogram_entropy(torch.randn(20, 64, device=CUDA), bad, 0.01, True)
