"""``gaussian_kl`` and ``layer_outliers``: the native CPU and CUDA kernels against float64
references, and the CUDA kernels against the CPU kernels and against themselves."""
from __future__ import annotations

import math

import pytest
import torch

import bdfast
from bdfast import ops, reference
from support.devices import CUDA_DEVICES, DEVICES, cpu_kernels

pytestmark = pytest.mark.skipif(not bdfast.backend_info()["native_cpu"],
                                reason="the compiled CPU kernels are not available")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm())


def bn_statistics(k, *, seed=0, dtype=torch.float32, device="cpu"):
    """Clean-data (p) and running (q) BN statistics of K channels, a few of them mismatched."""
    gen = torch.Generator().manual_seed(seed)
    mu_q = torch.randn(k, generator=gen)
    var_q = 0.1 + torch.rand(k, generator=gen)
    mu_p = mu_q + 0.1 * torch.randn(k, generator=gen)
    var_p = var_q * (1 + 0.2 * torch.randn(k, generator=gen)).abs()
    mu_p[::17] += 3.0  # backdoor-like channels: large divergence
    return [v.to(device=device, dtype=dtype) for v in (mu_p, var_p, mu_q, var_q)]


def kl_formula(mu_p, var_p, mu_q, var_q, eps=1e-5):
    """docs/ops.md's gaussian_kl written out with math, one element at a time (float64)."""
    out = []
    for a, va, b, vb in zip(*(v.double().tolist() for v in (mu_p, var_p, mu_q, var_q))):
        va, vb = max(va, eps), max(vb, eps)
        out.append(math.log(math.sqrt(vb) / math.sqrt(va)) + (va + (a - b) ** 2) / (2 * vb) - 0.5)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 7, 4800])
def test_gaussian_kl_matches_formula(device, dtype, k):
    stats = bn_statistics(k, seed=k, dtype=dtype, device=device)
    out = ops.gaussian_kl(*stats, backend="native")
    assert out.dtype == torch.float32 and out.shape == (k,) and out.device == stats[0].device
    assert rel_err(out, kl_formula(*stats)) < TOL[dtype]
    ref64 = reference.gaussian_kl(*(v.double() for v in stats))
    assert rel_err(out, ref64) < TOL[dtype]


@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 7, 4800, 1_100_003])  # the last one exceeds the grid
def test_cuda_gaussian_kl_matches_float64_reference(device, dtype, k):
    stats = bn_statistics(k, seed=k % 1000, dtype=dtype)
    out = ops.gaussian_kl(*(v.to(device) for v in stats), backend="native")
    assert out.device == torch.device(device) and out.dtype == torch.float32
    assert out.shape == (k,)
    ref = reference.gaussian_kl(*(v.double() for v in stats))
    assert rel_err(out, ref) < (1e-5 if dtype in (torch.float32, torch.float64) else 1e-2)


def test_gaussian_kl_floors_variances_and_mixes_dtypes():
    mu_p, var_p, mu_q, var_q = bn_statistics(64, seed=1)
    var_p[:4] = torch.tensor([0.0, -1.0, 1e-9, 1e-5])  # dead channels: floored at eps
    var_q[4:6] = 0.0
    out = ops.gaussian_kl(mu_p.half(), var_p, mu_q.bfloat16(), var_q.double(), eps=1e-5,
                          backend="native")
    ref = kl_formula(mu_p.half(), var_p, mu_q.bfloat16(), var_q.double(), eps=1e-5)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-5
    # Identical distributions have zero divergence, a larger eps lowers a floored one.
    same = ops.gaussian_kl(mu_q, var_q.clamp_min(1e-3), mu_q, var_q.clamp_min(1e-3))
    assert same.abs().max() < 1e-6
    bigger_eps = ops.gaussian_kl(mu_p, var_p, mu_q, var_q, eps=1e-2, backend="native")
    assert bigger_eps[0] < out[0]


def test_gaussian_kl_propagates_nan():
    mu_p, var_p, mu_q, var_q = bn_statistics(5, seed=2)
    mu_p[2] = float("nan")
    out = ops.gaussian_kl(mu_p, var_p, mu_q, var_q, backend="native")
    ref = reference.gaussian_kl(mu_p, var_p, mu_q, var_q)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(out[2])


@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
def test_cuda_gaussian_kl_floors_mixes_dtypes_and_propagates_nan(device):
    mu_p, var_p, mu_q, var_q = bn_statistics(64, seed=1)
    var_p[:4] = torch.tensor([0.0, -1.0, 1e-9, 1e-5])
    var_q[4:6] = 0.0
    mu_p[10] = float("nan")
    var_q[11] = float("nan")
    inputs = (mu_p.half(), var_p, mu_q.bfloat16(), var_q.double())
    out = ops.gaussian_kl(*(v.to(device) for v in inputs), backend="native")
    with cpu_kernels():
        cpu = ops.gaussian_kl(*inputs, backend="native")
    ref = reference.gaussian_kl(*(v.double() for v in inputs))
    assert torch.equal(out.isnan().cpu(), ref.isnan()) and out[10].isnan() and out[11].isnan()
    finite = ~ref.isnan()
    assert rel_err(out.cpu()[finite], ref[finite]) < 1e-5
    assert rel_err(out.cpu()[finite], cpu[finite]) < 1e-6


def outlier_rule(scores, offsets, u, direction):
    """docs/ops.md's layer_outliers rule written out in plain Python (statistics module,
    float64): the mask and the per-layer thresholds (NaN for a layer with fewer than 2 finite
    scores)."""
    import statistics
    values = scores.double().tolist()
    mask = [False] * len(values)
    thresholds = []
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        finite = [v for v in values[lo:hi] if math.isfinite(v)]
        if len(finite) < 2:
            thresholds.append(math.nan)
            continue
        m, sd = statistics.fmean(finite), statistics.stdev(finite)
        thresholds.append(m - u * sd if direction == "low" else m + u * sd)
        for i in range(lo, hi):
            mask[i] = values[i] < m - u * sd if direction == "low" else values[i] > m + u * sd
    return torch.tensor(mask, dtype=torch.bool), torch.tensor(thresholds, dtype=torch.float64)


def check_thresholds(thresholds, scores, offsets, u, direction):
    """The thresholds of a native call: float64 [L] on the scores' device, NaN exactly where a
    layer has fewer than 2 finite scores, and equal (to float64 rounding) to the reference and
    to the plain-Python rule, both evaluated in float64."""
    offsets = torch.as_tensor(offsets).tolist()
    assert thresholds.dtype == torch.float64 and thresholds.shape == (len(offsets) - 1,)
    assert thresholds.device == scores.device
    scores64 = scores.double().cpu()
    _, ref = reference.layer_outliers(scores64, torch.tensor(offsets), u=u, direction=direction,
                                      return_thresholds=True)
    _, rule = outlier_rule(scores64, offsets, u, direction)
    for expected in (ref, rule):
        torch.testing.assert_close(thresholds.cpu(), expected, rtol=1e-12, atol=1e-12,
                                   equal_nan=True)


def packed_scores(sizes, *, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.cat([torch.randn(n, generator=gen) * (1 + i) + 3 * i
                        for i, n in enumerate(sizes)])
    if scores.numel() > 10:
        scores[3] -= 25.0   # clear low outlier
        scores[-10] += 25.0  # clear high outlier (before a small last layer)
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    return scores.to(dtype), offsets


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", ["low", "high"])
@pytest.mark.parametrize("u", [0.5, 2.0, 3.0])
def test_layer_outliers_match_rule(device, dtype, direction, u):
    scores, offsets = packed_scores([40, 3, 64, 512, 7], seed=int(u * 10), dtype=dtype)
    scores = scores.to(device)
    out, thresholds = ops.layer_outliers(scores, torch.tensor(offsets), u=u,
                                         direction=direction, return_thresholds=True,
                                         backend="native")
    assert out.dtype == torch.bool and out.shape == scores.shape
    expected, _ = outlier_rule(scores.cpu(), offsets, u, direction)
    assert torch.equal(out.cpu(), expected)
    check_thresholds(thresholds, scores, offsets, u, direction)
    assert torch.equal(out.cpu(), reference.layer_outliers(scores.cpu(), torch.tensor(offsets),
                                                           u=u, direction=direction))
    if u == 3.0:  # the planted outliers are found
        assert bool(out[3]) == (direction == "low") and bool(out[-10]) == (direction == "high")


@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", ["low", "high"])
@pytest.mark.parametrize("u", [0.5, 3.0])
def test_cuda_layer_outliers_match_reference_and_cpu(device, dtype, direction, u):
    scores, offsets = packed_scores([40, 3, 64, 5000, 7, 1], seed=int(u * 10), dtype=dtype)
    offsets = torch.tensor(offsets)
    out, thresholds = ops.layer_outliers(scores.to(device), offsets, u=u, direction=direction,
                                         return_thresholds=True, backend="native")
    assert out.device == torch.device(device) and out.dtype == torch.bool
    ref = reference.layer_outliers(scores, offsets, u=u, direction=direction)
    assert torch.equal(out.cpu(), ref)
    with cpu_kernels():
        cpu_out, cpu_thresholds = ops.layer_outliers(scores, offsets, u=u, direction=direction,
                                                     return_thresholds=True, backend="native")
    assert torch.equal(out.cpu(), cpu_out)
    check_thresholds(thresholds, scores.to(device), offsets, u, direction)
    torch.testing.assert_close(thresholds.cpu(), cpu_thresholds, rtol=1e-12, atol=1e-12,
                               equal_nan=True)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_layer_outliers_nan_inf_and_small_layers(device):
    scores, offsets = packed_scores([30, 1, 2, 5, 0, 20], seed=3)
    scores[0] = float("nan")          # never flagged, excluded from the statistics
    scores[1] = -float("inf")         # excluded from the statistics, flagged as low
    scores[31:33] = torch.tensor([float("nan"), 5.0])  # one finite score: nothing flagged
    scores[33:38] = float("nan")      # no finite score
    for direction in ("low", "high"):
        out, thresholds = ops.layer_outliers(scores.to(device), torch.tensor(offsets), u=1.0,
                                             direction=direction, return_thresholds=True,
                                             backend="native")
        out = out.cpu()
        assert torch.equal(out, outlier_rule(scores, offsets, 1.0, direction)[0])
        assert torch.equal(out, reference.layer_outliers(scores, torch.tensor(offsets), u=1.0,
                                                         direction=direction))
        assert not out[0] and not out[30:38].any()
        assert bool(out[1]) == (direction == "low")
        check_thresholds(thresholds, scores.to(device), offsets, 1.0, direction)
        # Layers of 1, 2 (one NaN), 5 (all NaN) and 0 scores have no threshold.
        assert thresholds[1:5].isnan().all() and thresholds[[0, 5]].isfinite().all()
    low = ops.layer_outliers(scores, torch.tensor(offsets), u=1.0, direction="low")
    assert low[1]
    # A single score: no standard deviation, nothing flagged, a NaN threshold.
    one, threshold = ops.layer_outliers(torch.tensor([2.5], device=device), u=1.0,
                                        return_thresholds=True, backend="native")
    assert not one.any() and threshold.shape == (1,) and threshold.isnan().all()


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_layer_outliers_thresholds_only_when_asked(backend):
    scores, offsets = packed_scores([40, 3, 64], seed=7)
    offsets = torch.tensor(offsets)
    mask = ops.layer_outliers(scores, offsets, u=2.0, backend=backend)
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
    both = ops.layer_outliers(scores, offsets, u=2.0, return_thresholds=True, backend=backend)
    assert isinstance(both, tuple) and len(both) == 2
    assert torch.equal(both[0], mask) and both[1].dtype == torch.float64
    # The thresholds are the ones the mask was cut at: flagged scores lie below their layer's.
    layer = torch.repeat_interleave(torch.arange(3), offsets.diff())
    assert torch.equal(mask, scores.double() < both[1][layer])


def test_layer_outliers_default_single_layer():
    scores, _ = packed_scores([200], seed=4)
    out = ops.layer_outliers(scores, backend="native")
    assert torch.equal(out, outlier_rule(scores, [0, 200], 3.0, "low")[0])
    assert out[3] and out.sum() >= 1


@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
def test_cuda_kernels_are_deterministic(device):
    scores, offsets = packed_scores([4000, 300, 77], seed=5)
    scores, offsets = scores.to(device), torch.tensor(offsets, device=device)
    first = torch.ops.bdfast.layer_outliers(scores, offsets, 2.0, False)
    second = torch.ops.bdfast.layer_outliers(scores, offsets, 2.0, False)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    stats = [v.to(device) for v in bn_statistics(5000, seed=6)]
    assert torch.equal(torch.ops.bdfast.gaussian_kl(*stats, 1e-5),
                       torch.ops.bdfast.gaussian_kl(*stats, 1e-5))
