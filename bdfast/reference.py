"""Pure-PyTorch reference implementations of bdfast's fused ops.

This module is the ground truth: it favours readability over speed, and the tests check every
native kernel against it evaluated in float64. Each function computes in float32 (or in the
input's precision when that is higher) and returns float32 for 16-bit inputs.

Equation numbers refer to the MEDIC paper (``medic_clone_loss``) and the DDE/MBNS paper
(``histogram_entropy``, ``gaussian_kl``, ``layer_outliers``).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

# The reference_compat grid of one layer has at most this many bins (the CPU kernel stores one
# float32 edge per bin and has the same limit and error sentence): 64 MiB of edges, which a
# step of 1e-6 on a million standardised samples still fits.
MAX_COMPAT_BINS = 1 << 24

__all__ = [
    "MAX_COMPAT_BINS",
    "medic_importance",
    "medic_clone_loss",
    "histogram_entropy",
    "gaussian_kl",
    "layer_outliers",
]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (16-bit inputs are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_channel(v: Tensor, like: Tensor) -> Tensor:
    """View a [C] vector so that it broadcasts over ``like`` of shape [B, C, *spatial]."""
    return v.view(1, -1, *([1] * (like.dim() - 2)))


def medic_importance(t: Tensor, g: Tensor, mu: Tensor, sigma: Tensor, *, tau: float = 5.0,
                     eps: float = 1e-5, signed: bool = False) -> Tensor:
    """Per-element importance w of one hooked layer (MEDIC eqs. 2-4).

    Args:
        t: teacher activation [B, C, *spatial].
        g: gradient of the teacher's per-sample loss w.r.t. ``t``, same shape.
        mu, sigma: per-channel mean and standard deviation of ``t`` over the clean set, [C].

    Returns:
        w [B, C, *spatial] in the compute dtype; each sample's row sums to at most 1.

    For each sample, over all C*prod(spatial) elements of the layer::

        z = |t - mu| / (sigma + eps)           eq. (2), the normalised deviation
        q = |sigma * g|                         eq. (3), the proxy gradient
        w = sqrt(softmax(tau * z) * softmax(tau * q))            eq. (4)

    ``signed=True`` drops both absolute values, as the released code does.
    """
    dtype = _compute_dtype(t, g)
    t, g = t.to(dtype), g.to(dtype)
    mu_b, sig_b = _per_channel(mu.to(dtype), t), _per_channel(sigma.to(dtype), t)
    z = (t - mu_b) / (sig_b + eps)
    q = sig_b * g
    if not signed:
        z, q = z.abs(), q.abs()
    rows = t.shape[0]
    a = torch.softmax(tau * z.reshape(rows, -1), dim=1)
    p = torch.softmax(tau * q.reshape(rows, -1), dim=1)
    return torch.sqrt(a * p).reshape(t.shape)


def medic_clone_loss(t: Sequence[Tensor], s: Sequence[Tensor], g: Sequence[Tensor],
                     mu: Sequence[Tensor], sigma: Sequence[Tensor], *, tau: float = 5.0,
                     eps: float = 1e-5, signed: bool = False,
                     return_weights: bool = False):
    """Importance-weighted clone loss over all hooked layers (MEDIC eq. 1).

    Args:
        t, s, g: per-layer lists of teacher activations, student activations and teacher
            gradients, each [B, C_l, *spatial_l].
        mu, sigma: per-layer lists of per-channel statistics [C_l].
        tau: the softmax temperature of :func:`medic_importance`; 5 is the paper's (MEDIC's
            defense itself defaults to 20, see :func:`bdfast.medic_clone`).

    Returns:
        The scalar ``sum_l (1/B) sum_b sum_i w_i ((t_i - s_i) / (sigma_c + eps))^2``, with w from
        :func:`medic_importance` treated as a constant. Gradients flow to ``s`` only. With
        ``return_weights=True``, also the list of per-layer w.
    """
    dtype = _compute_dtype(*t, *s, *g)
    loss = torch.zeros((), dtype=dtype, device=s[0].device)
    weights: List[Tensor] = []
    for t_l, s_l, g_l, mu_l, sigma_l in zip(t, s, g, mu, sigma):
        with torch.no_grad():
            w = medic_importance(t_l.detach(), g_l.detach(), mu_l, sigma_l, tau=tau, eps=eps,
                                 signed=signed)
        sig_b = _per_channel(sigma_l.to(dtype), t_l) + eps
        e = (t_l.detach().to(dtype) - s_l.to(dtype)) / sig_b
        loss = loss + (w * e.square()).sum() / t_l.shape[0]
        weights.append(w)
    return (loss, weights) if return_weights else loss


def _standardize(x: Tensor) -> tuple[Tensor, Tensor]:
    """Standardise columns of x [N, K]; returns (y [N, K], valid [K]).

    A column is valid when it is finite and not constant; invalid columns are left as NaN.
    """
    mean = x.mean(dim=0)
    sd = x.std(dim=0, unbiased=True) if x.shape[0] > 1 else torch.full_like(mean, float("nan"))
    valid = torch.isfinite(x).all(dim=0) & (sd > 0)
    y = (x - mean) / torch.where(valid, sd, torch.ones_like(sd))
    y[:, ~valid] = float("nan")
    return y, valid


def _default_offsets(offsets: Optional[Tensor], k: int, device) -> List[int]:
    if offsets is None:
        return [0, k]
    return [int(o) for o in offsets.tolist()]


def histogram_entropy(x: Tensor, offsets: Optional[Tensor] = None, *, step: float = 0.01,
                      reference_compat: bool = False) -> Tensor:
    """Histogram estimate of each neuron's differential entropy (DDE paper, Sec. 4.1).

    Args:
        x: [N, K] samples of K neurons; the neurons of all layers are packed side by side.
        offsets: [L+1] int64 layer boundaries in ``x``'s columns (``None``: one layer).
        step: bin width in standardised units.
        reference_compat: reproduce the released per-bin loop (see below).

    Returns:
        h [K] (float32, or float64 for float64 input). Constant or non-finite columns give NaN.

    Default estimator, per column: standardise ``y = (x - mean) / std`` (unbiased std), put
    ``y`` in bins of width ``step`` starting at the column's own minimum (the maximum falls in
    the last bin), and return ``-sum_j p_j ln(p_j / step)`` with ``p_j = n_j / N``.

    ``reference_compat=True`` is the released code's loop: one grid per layer starting at the
    layer's global minimum over its valid standardised columns, ``int((max - min) / step)``
    bins computed in float32, bin n the *open* interval between the float32 edges
    ``min + n*step`` and ``min + (n+1)*step``; values on an edge and in the last partial bin
    are dropped, but ``p = count / N`` still divides by the full N, and ``h = -sum p ln p``.
    """
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    n, k = x.shape
    h = torch.full((k,), float("nan"), dtype=dtype, device=x.device)
    bounds = _default_offsets(offsets, k, x.device)
    for layer, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi == lo:
            continue
        y, valid = _standardize(x[:, lo:hi])
        if not bool(valid.any()):
            continue
        if reference_compat:
            h[lo:hi] = _entropy_released_grid(y.float(), valid, n, step, layer).to(dtype)
        else:
            h[lo:hi] = _entropy_own_grid(y, valid, n, step)
    return h


def _entropy_own_grid(y: Tensor, valid: Tensor, n: int, step: float) -> Tensor:
    """Default estimator for one layer's standardised columns y [N, K_l].

    Bin counts come from sorting each column's bin indices (a new bin starts where the sorted
    index changes), so memory stays O(N K_l) however small ``step`` is.
    """
    h = torch.full((y.shape[1],), float("nan"), dtype=y.dtype, device=y.device)
    yv = y[:, valid]
    bin_index = torch.floor((yv - yv.min(dim=0).values) / step).sort(dim=0).values
    starts = torch.ones_like(bin_index, dtype=torch.bool)
    starts[1:] = bin_index[1:] != bin_index[:-1]
    run = starts.long().cumsum(dim=0) - 1  # [N, K_l]: which non-empty bin each value is in
    counts = torch.zeros(yv.shape, dtype=y.dtype, device=y.device)
    counts.scatter_add_(0, run, torch.ones_like(yv))
    p = counts / n
    plogp = torch.where(p > 0, p * torch.log(p / step), torch.zeros_like(p))
    h[valid] = -plogp.sum(dim=0)
    return h


def _entropy_released_grid(y: Tensor, valid: Tensor, n: int, step: float, layer: int) -> Tensor:
    """The released per-bin loop for one layer, on float32 standardised columns y [N, K_l]."""
    yv = y[:, valid]
    gmin, gmax = yv.min(), yv.max()
    span = float((gmax - gmin) / step)
    if span > MAX_COMPAT_BINS:
        raise ValueError(f"histogram_entropy: step {step} needs {span:g} bins for layer {layer} "
                         f"of the reference_compat estimator, more than the {MAX_COMPAT_BINS} "
                         "allowed; use a larger step")
    num_bins = int((gmax - gmin) / step)
    h = torch.zeros(yv.shape[1], dtype=torch.float64, device=y.device)
    for b in range(num_bins):
        # A Python float added to a float32 tensor is rounded to float32 first.
        lower = gmin + b * step
        upper = gmin + (b + 1) * step
        p = ((yv > lower) & (yv < upper)).sum(dim=0).double() / n
        h -= torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
    out = torch.full((y.shape[1],), float("nan"), dtype=torch.float64, device=y.device)
    out[valid] = h
    return out


def gaussian_kl(mu_p: Tensor, var_p: Tensor, mu_q: Tensor, var_q: Tensor, *,
                eps: float = 1e-5) -> Tensor:
    """Closed-form KL(N(mu_p, var_p) || N(mu_q, var_q)), elementwise over [K] (MBNS, Sec. 4.2).

    ``log(sd_q / sd_p) + (var_p + (mu_p - mu_q)^2) / (2 var_q) - 1/2``, with both variances
    floored at ``eps`` so that a dead channel gives a large finite divergence instead of NaN.
    """
    dtype = _compute_dtype(mu_p, var_p, mu_q, var_q)
    mu_p, var_p, mu_q, var_q = (v.to(dtype) for v in (mu_p, var_p, mu_q, var_q))
    var_p, var_q = var_p.clamp_min(eps), var_q.clamp_min(eps)
    return 0.5 * torch.log(var_q / var_p) + (var_p + (mu_p - mu_q) ** 2) / (2 * var_q) - 0.5


def layer_outliers(scores: Tensor, offsets: Optional[Tensor] = None, *, u: float = 3.0,
                   direction: str = "low", return_thresholds: bool = False
                   ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Flag per-layer outliers in packed scores [K] (DDE/MBNS pruning rule).

    For each layer, with mean m and unbiased std sd of its finite scores, flag
    ``score < m - u*sd`` (``direction="low"``) or ``score > m + u*sd`` (``"high"``).
    NaN scores are excluded from m and sd and never flagged. Returns bool [K], and with
    ``return_thresholds`` the tuple ``(mask, thresholds)``: the per-layer ``m -/+ u*sd``, [L]
    float64, NaN for a layer with fewer than 2 finite scores (which flags nothing).
    """
    if direction not in ("low", "high"):
        raise ValueError(f"direction must be 'low' or 'high', got {direction!r}")
    scores64 = scores.double()
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    bounds = _default_offsets(offsets, scores.numel(), scores.device)
    thresholds = torch.full((len(bounds) - 1,), math.nan, dtype=torch.float64,
                            device=scores.device)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        layer = scores64[lo:hi]
        finite = layer[torch.isfinite(layer)]
        if finite.numel() < 2:
            continue
        m, sd = finite.mean(), finite.std(unbiased=True)
        thresholds[i] = m - u * sd if direction == "low" else m + u * sd
        mask[lo:hi] = layer < thresholds[i] if direction == "low" else layer > thresholds[i]
    return (mask, thresholds) if return_thresholds else mask
