"""Inputs and transcriptions shared by the CPU and CUDA tests of ``histogram_entropy``."""
from __future__ import annotations

import torch


def activations(n, k, *, seed=0, dtype=torch.float32):
    """[N, K] BN-input-like activations: per-column scale and shift, some columns skewed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=gen) * (0.2 + 2 * torch.rand(k, generator=gen))
    x += torch.randn(k, generator=gen)
    skewed = torch.rand(k, generator=gen) < 0.4
    x[:, skewed] = x[:, skewed].exp()  # long right tails stretch the layer's grid
    return x.to(dtype)


def compare(out, ref) -> float:
    """NaN positions must agree; returns the relative error over the finite entries."""
    out = torch.as_tensor(out).detach().double().cpu()
    ref = torch.as_tensor(ref).detach().double().cpu()
    assert out.shape == ref.shape
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), (out, ref)
    finite = ~torch.isnan(ref)
    if not finite.any():
        return 0.0
    return float((out[finite] - ref[finite]).norm() / ref[finite].norm().clamp_min(1e-30))


def released_loop(x: torch.Tensor, offsets, step: float) -> torch.Tensor:
    """The authors' estimator as a plain per-bin loop (``reference_compat=True`` in docs/ops.md).

    Standardisation uses the correctly rounded float32 mean and standard deviation: torch's own
    float32 column sums depend on the CPU's vector width, which moves a value across a bin edge
    about once in 10^5; the kernels round the exact moments, and so does this transcription.
    """
    x = x.float().cpu()
    n, k = x.shape
    h = torch.full((k,), float("nan"), dtype=torch.float64)
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        if hi == lo:
            continue
        layer = x[:, lo:hi]
        mean = layer.double().mean(0).float()
        sd = layer.double().std(0).float()
        valid = torch.isfinite(layer).all(0) & (sd > 0)
        if not valid.any():
            continue
        y = ((layer - mean) / sd)[:, valid]
        ymin, ymax = y.min(), y.max()
        total = torch.zeros(int(valid.sum()), dtype=torch.float64)
        for b in range(int((ymax - ymin) / step)):
            inside = (y > ymin + b * step) & (y < ymin + (b + 1) * step)
            p = inside.sum(0).double() / n
            total -= torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
        part = torch.full((hi - lo,), float("nan"), dtype=torch.float64)
        part[valid] = total
        h[lo:hi] = part
    return h
