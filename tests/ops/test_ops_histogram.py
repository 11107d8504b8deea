"""``histogram_entropy``: both estimators of docs/ops.md against independent transcriptions, on
the CPU and CUDA kernels, and the CUDA kernel against the CPU kernel and against itself.

- The default estimator against a float64 NumPy computation written here from docs/ops.md, and
  against a float64 evaluation of :func:`bdfast.reference.histogram_entropy`.
- ``reference_compat=True`` against a plain transcription of the authors' per-bin loop, and
  against :func:`bdfast.reference.histogram_entropy`.
16-bit inputs are compared on the same rounded values, upcast. On CUDA the cases include
columns whose bins need several shared-memory passes.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import bdfast
from bdfast import ops, reference
from support.devices import CUDA, CUDA_DEVICES, DEVICES, cpu_kernels, gpu_only
from support.histogram_cases import activations, compare, released_loop

pytestmark = pytest.mark.skipif(not bdfast.backend_info()["native_cpu"],
                                reason="the compiled CPU kernels are not available")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def numpy_default(x: torch.Tensor, step: float) -> np.ndarray:
    """docs/ops.md's default estimator, one column at a time, in float64 NumPy."""
    x = x.double().numpy()
    n, k = x.shape
    h = np.full(k, np.nan)
    for c in range(k):
        col = x[:, c]
        if not np.isfinite(col).all():
            continue
        sd = col.std(ddof=1)
        if not sd > 0:
            continue
        y = (col - col.mean()) / sd
        _, counts = np.unique(np.floor((y - y.min()) / step).astype(np.int64),
                              return_counts=True)
        p = counts / n
        h[c] = -(p * np.log(p / step)).sum()
    return h


SHAPES = [  # (N, K, offsets)
    (2, 3, [0, 3]),
    (50, 1, [0, 1]),
    (300, 40, [0, 40]),
    (257, 37, [0, 5, 5, 18, 37]),  # uneven layers and an empty one
    (64, 70, [0, 1, 33, 70]),
    (1100, 70, [0, 1, 33, 70]),    # more samples than a CUDA block has threads
]


@pytest.mark.parametrize("n,k,offsets", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_default_matches_numpy(n, k, offsets, dtype):
    x = activations(n, k, seed=n + k, dtype=dtype)
    out = ops.histogram_entropy(x, torch.tensor(offsets), backend="native")
    assert out.dtype == torch.float32 and out.shape == (k,)
    assert compare(out, numpy_default(x, 0.01)) < 1e-5


@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
@pytest.mark.parametrize("n,k,offsets", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_default_matches_float64_reference(device, n, k, offsets, dtype):
    x = activations(n, k, seed=n + k, dtype=dtype)
    out = ops.histogram_entropy(x.to(device), torch.tensor(offsets), backend="native")
    assert out.device == torch.device(device) and out.dtype == torch.float32 and out.shape == (k,)
    ref = reference.histogram_entropy(x.double(), torch.tensor(offsets))
    assert compare(out, ref) < 1e-5


@pytest.mark.parametrize("step", [0.01, 0.1, 1.5])
def test_default_matches_float64_reference(step):
    x = activations(400, 24, seed=3)
    out = ops.histogram_entropy(x, step=step, backend="native")
    ref = reference.histogram_entropy(x.double(), step=step)
    assert compare(out, ref) < 1e-5


@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
@pytest.mark.parametrize("step", [1.5, 0.1, 1e-4], ids=str)
def test_cuda_default_with_several_passes(device, step):
    # 1e-4 over 3,000 samples needs up to ~10^5 bins: several shared-memory passes.
    x = activations(3000, 6, seed=4)
    out = ops.histogram_entropy(x.to(device), step=step, backend="native")
    assert compare(out, reference.histogram_entropy(x.double(), step=step)) < 1e-5


def test_default_with_more_bins_than_the_dense_buffer():
    # step 1e-6 over a spread of several standard deviations: millions of bins (sorted counts).
    x = activations(60, 3, seed=4)
    out = ops.histogram_entropy(x, step=1e-6, backend="native")
    # Every sample in its own bin: h = ln N + ln step ... exactly what NumPy counts.
    assert compare(out, numpy_default(x, 1e-6)) < 1e-5
    assert compare(out, np.full(3, math.log(60) + math.log(1e-6))) < 1e-5


@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
def test_cuda_default_sparse_bins(device):
    # step 1e-6: ten million bins, every sample alone in its own, far apart; the passes skip
    # the empty stretches. h = ln N + ln step exactly.
    x = activations(60, 3, seed=4)
    out = ops.histogram_entropy(x.to(device), step=1e-6, backend="native")
    assert compare(out, [math.log(60) + math.log(1e-6)] * 3) < 1e-5
    with cpu_kernels():
        cpu = ops.histogram_entropy(x, step=1e-6, backend="native")
    assert compare(out, cpu) < 1e-6


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("n,k,offsets", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compat_matches_released_loop(device, n, k, offsets, dtype):
    x = activations(n, k, seed=7 * n + k, dtype=dtype)
    step = 0.05  # fewer bins keep the per-bin loop quick; 0.01 is tested below
    out = ops.histogram_entropy(x.to(device), torch.tensor(offsets), step=step,
                                reference_compat=True, backend="native")
    assert compare(out, released_loop(x, offsets, step)) < 1e-5


def test_compat_at_the_default_step():
    x = activations(200, 12, seed=11)
    offsets = [0, 4, 12]
    out = ops.histogram_entropy(x, torch.tensor(offsets), reference_compat=True,
                                backend="native")
    assert compare(out, released_loop(x, offsets, 0.01)) < 1e-5


@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
def test_cuda_compat_at_the_default_step_with_several_passes(device):
    x = activations(2000, 12, seed=11)
    offsets = [0, 4, 12]
    out = ops.histogram_entropy(x.to(device), torch.tensor(offsets), reference_compat=True,
                                backend="native")
    assert compare(out, released_loop(x, offsets, 0.01)) < 1e-5
    fine = ops.histogram_entropy(x.to(device), torch.tensor(offsets), step=2e-4,
                                 reference_compat=True, backend="native")
    with cpu_kernels():
        cpu = ops.histogram_entropy(x, torch.tensor(offsets), step=2e-4, reference_compat=True,
                                    backend="native")
    assert compare(fine, cpu) < 1e-6


def test_compat_against_the_reference():
    # The reference standardises with torch's float32 sums; an ulp there can move a value
    # across an edge (a change of about 1/N in one column), so most columns must agree exactly.
    x = activations(300, 48, seed=12)
    offsets = torch.tensor([0, 16, 48])
    out = ops.histogram_entropy(x, offsets, step=0.02, reference_compat=True, backend="native")
    ref = reference.histogram_entropy(x, offsets, step=0.02, reference_compat=True)
    assert compare(out, ref) < 1e-3
    assert (out - ref).abs().le(1e-6).float().mean() >= 0.95


def test_compat_drops_edges_and_the_last_partial_bin():
    # Columns -1, 0, 1 (and an affine copy) standardise exactly to y = -1, 0, 1 (sd = 1).
    x = torch.tensor([[-1.0, -4.0], [0.0, 3.0], [1.0, 10.0]])
    # step 0.25: every y lies on an edge (-1 + 0.25 b), so the released loop counts nothing,
    # while the default estimator has three bins of p = 1/3.
    compat = ops.histogram_entropy(x, step=0.25, reference_compat=True, backend="native")
    assert compat.tolist() == [0.0, 0.0]
    default = ops.histogram_entropy(x, step=0.25, backend="native")
    assert compare(default, [-math.log(4 / 3)] * 2) < 1e-6
    # step 0.3: int(2 / 0.3) = 6 bins up to 0.8; -1 is on the first edge, 1 in the dropped
    # partial bin, and only 0 is counted (p = 1/3 with the full N).
    compat = ops.histogram_entropy(x, step=0.3, reference_compat=True, backend="native")
    assert compare(compat, [math.log(3) / 3] * 2) < 1e-6
    assert compare(compat, released_loop(x, [0, 2], 0.3)) < 1e-6


@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
def test_cuda_values_on_edges(device):
    # Three samples -1, 0, 1 per column (sd 1): compat drops edge values and the partial bin.
    x = torch.tensor([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]], device=device)
    compat = ops.histogram_entropy(x, step=0.25, reference_compat=True, backend="native")
    assert compat.tolist() == [0.0, 0.0]
    compat = ops.histogram_entropy(x, step=0.3, reference_compat=True, backend="native")
    assert compare(compat, [math.log(3) / 3] * 2) < 1e-6
    default = ops.histogram_entropy(x, step=0.25, backend="native")
    assert compare(default, [-math.log(4 / 3)] * 2) < 1e-6


@pytest.mark.parametrize("compat", [False, True], ids=["default", "compat"])
def test_constant_and_non_finite_columns_are_nan(compat):
    x = activations(100, 8, seed=5)
    x[:, 1] = 3.25                 # constant
    x[17, 2] = float("nan")
    x[3, 4] = float("inf")
    x[:, 6] = 0.0                  # a dead channel
    offsets = [0, 5, 8]
    out = ops.histogram_entropy(x, torch.tensor(offsets), reference_compat=compat,
                                backend="native")
    assert torch.isnan(out[[1, 2, 4, 6]]).all() and torch.isfinite(out[[0, 3, 5, 7]]).all()
    # Invalid columns must not shift the compat grid of the other columns of their layer.
    ref = released_loop(x, offsets, 0.01) if compat else numpy_default(x, 0.01)
    assert compare(out, ref) < 1e-5


@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
@pytest.mark.parametrize("compat", [False, True], ids=["default", "compat"])
def test_cuda_constant_and_non_finite_columns_are_nan(device, compat):
    x = activations(100, 8, seed=5)
    x[:, 1] = 3.25
    x[17, 2] = float("nan")
    x[3, 4] = float("inf")
    x[:, 6] = 0.0
    offsets = [0, 5, 8]
    out = ops.histogram_entropy(x.to(device), torch.tensor(offsets), reference_compat=compat,
                                backend="native")
    assert torch.isnan(out[[1, 2, 4, 6]]).all() and torch.isfinite(out[[0, 3, 5, 7]]).all()
    ref = (released_loop(x, offsets, 0.01) if compat
           else reference.histogram_entropy(x.double(), torch.tensor(offsets)))
    assert compare(out, ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("compat", [False, True], ids=["default", "compat"])
def test_layer_without_valid_columns(device, compat):
    x = activations(30, 6, seed=6)
    x[:, :3] = 1.0
    out = ops.histogram_entropy(x.to(device), torch.tensor([0, 3, 6]), reference_compat=compat,
                                backend="native")
    assert torch.isnan(out[:3]).all() and torch.isfinite(out[3:]).all()


def test_compat_grid_is_per_layer():
    # The same columns give other entropies when another layer's columns join their grid.
    x = activations(120, 10, seed=8)
    x[:, 5:] = -torch.randn(120, 5).mul(1.5).exp()  # long left tails: a lower grid origin
    split = ops.histogram_entropy(x, torch.tensor([0, 5, 10]), reference_compat=True,
                                  backend="native")
    joint = ops.histogram_entropy(x, torch.tensor([0, 10]), reference_compat=True,
                                  backend="native")
    assert compare(joint, released_loop(x, [0, 10], 0.01)) < 1e-5
    assert not torch.allclose(split[:5], joint[:5])
    default = ops.histogram_entropy(x, torch.tensor([0, 5, 10]), backend="native")
    assert torch.equal(default, ops.histogram_entropy(x, backend="native"))


def test_standardisation_invariance_of_default():
    # h of the standardised column does not change under x -> a x + b (a > 0).
    x = activations(500, 16, seed=9).double()
    out = ops.histogram_entropy(x.float(), backend="native")
    moved = ops.histogram_entropy((3 * x + 100).float(), backend="native")
    assert compare(moved, out) < 5e-2  # bins can shift by rounding, entropies barely


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_auto_backend_and_reference_agree(device):
    x = activations(150, 20, seed=10).to(device)
    auto = ops.histogram_entropy(x, reference_compat=True)
    ref = ops.histogram_entropy(x, step=0.01, reference_compat=True, backend="reference")
    assert auto.device == x.device
    assert compare(auto, ref) < 1e-3


# ---------------------------------------------------------------------------------------------
# The CUDA kernel against the CPU kernel and itself, and under CUDA graph capture

@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
@pytest.mark.parametrize("compat", [False, True], ids=["default", "compat"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu_kernel(device, compat, dtype):
    x = activations(500, 300, seed=13, dtype=dtype)
    x[:, 7] = 2.0
    offsets = torch.tensor([0, 64, 64, 192, 300])
    out = ops.histogram_entropy(x.to(device), offsets, reference_compat=compat, backend="native")
    with cpu_kernels():
        cpu = ops.histogram_entropy(x, offsets, reference_compat=compat, backend="native")
    assert compare(out, cpu) < 1e-6


@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
def test_cuda_is_deterministic(device):
    x = activations(500, 256, seed=14).to(device)
    offsets = torch.tensor([0, 100, 256])
    for compat in (False, True):
        first = ops.histogram_entropy(x, offsets, reference_compat=compat, backend="native")
        again = ops.histogram_entropy(x, offsets, reference_compat=compat, backend="native")
        assert torch.equal(first.isnan(), again.isnan())
        assert torch.equal(first.nan_to_num(), again.nan_to_num())


@gpu_only
def test_cuda_compat_under_graph_capture():
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
