"""``medic_clone_loss``: MEDIC's importance weights and weighted clone loss, all layers at once."""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

from bdfast import reference
from bdfast.ops import _extension
from bdfast._utils import channels_innermost
from bdfast.ops._dispatch import (FLOAT_DTYPES, check_same_device, check_scalar, check_tensor,
                                  fake_check, use_native)

_NAMES = ("t", "s", "g", "mu", "sigma")


def medic_clone_loss(t: Sequence[Tensor], s: Sequence[Tensor], g: Sequence[Tensor],
                     mu: Sequence[Tensor], sigma: Sequence[Tensor], *, tau: float = 5.0,
                     eps: float = 1e-5, signed: bool = False, backend: str = "auto",
                     return_weights: bool = False
                     ) -> Union[Tensor, Tuple[Tensor, List[Tensor]]]:
    """Importance-weighted clone loss summed over all hooked layers (MEDIC eqs. 1-4).

    Args:
        t: teacher activations, one [B, C_l, *spatial_l] tensor per layer (spatial may be empty).
        s: student activations, same shapes; the only input that receives a gradient.
        g: gradients of the teacher's per-sample loss w.r.t. ``t``, same shapes.
        mu, sigma: per-channel mean and std of each teacher layer over the clean set, [C_l].
        tau: softmax temperature; eps: added to sigma (both finite in float32, eps > 0). The
            op's default tau is the paper's 5; :func:`bdfast.medic_clone` passes its own
            default, 20, chosen on the efficacy matrix (see its docstring).
        signed: use signed deviations and gradients (the released code) instead of absolute.
        backend: "auto" (compiled kernel when available), "native" or "reference".
        return_weights: also return the per-layer importance w (materialised, for inspection).

    Returns:
        The float32 scalar ``sum_l 1/B sum_b sum_i w_i ((t_i - s_i) / (sigma_c + eps))^2``, where
        ``w = sqrt(softmax(tau*z) * softmax(tau*q))`` over each (layer, sample) row, and with
        ``return_weights`` the tuple ``(loss, [w_l])``.

    t, s and g of one layer may be float32, float16 or bfloat16 (if their dtypes differ they
    are promoted to float32). They are read in place when all three are contiguous or all
    store their channels innermost, in any rank >= 3 (``x.movedim(1, -1).is_contiguous()``:
    a channels_last map, or ``y.movedim(-1, 1)`` of a contiguous token output ``y [B, L, C]``);
    otherwise all three are made contiguous if one of them is, else channels-innermost if one of
    them is, which copies only the others.
    The compiled kernels make one pass over t, s and g for the loss and one more for the
    gradient, and never materialise w; the gradient of s has s's strides.
    """
    t, s, g, mu, sigma = _validated(t, s, g, mu, sigma, tau, eps)
    if use_native("medic_clone_loss", backend, s[0].device):
        loss, _ = torch.ops.bdfast.medic_clone_loss(t, s, g, mu, sigma, float(tau), float(eps),
                                                    bool(signed))
    else:
        loss = reference.medic_clone_loss(t, s, g, mu, sigma, tau=tau, eps=eps, signed=signed)
    # A float32 overflow (e.g. activations near 1e30) ends as inf on one backend and as NaN
    # (inf * 0) on the other; both are NaN here, which training reports as a non-finite loss.
    loss = torch.where(torch.isfinite(loss), loss, torch.full_like(loss, float("nan")))
    if not return_weights:
        return loss
    weights = [reference.medic_importance(t_l, g_l, mu_l, sigma_l, tau=tau, eps=eps,
                                          signed=signed)
               for t_l, g_l, mu_l, sigma_l in zip(t, g, mu, sigma)]
    return loss, weights


def _validated(t, s, g, mu, sigma, tau, eps):
    """Check the five per-layer lists and bring each layer into a layout the kernels read."""
    lists = (t, s, g, mu, sigma)
    for name, value in zip(_NAMES, lists):
        if isinstance(value, Tensor) or not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors (one per hooked layer), "
                            f"got {type(value).__name__}")
    lengths = [len(v) for v in lists]
    if len(set(lengths)) != 1 or lengths[0] == 0:
        raise ValueError("t, s, g, mu and sigma must be non-empty lists of the same length (one "
                         f"entry per hooked layer), got lengths {', '.join(map(str, lengths))}")
    check_scalar(tau, "tau")
    check_scalar(eps, "eps", positive=True)
    out = ([], [], [], [], [])
    for i, layer in enumerate(zip(*lists)):
        t_l, s_l, g_l, mu_l, sigma_l = (
            check_tensor(v, f"{n}[{i}]", dims=None if n in ("t", "s", "g") else (1,),
                         dtypes=FLOAT_DTYPES + (torch.float64,))
            for n, v in zip(_NAMES, layer))
        if t_l.dim() < 2:
            raise ValueError(f"t[{i}] must have shape [B, C, *spatial], got {list(t_l.shape)}")
        if s_l.shape != t_l.shape or g_l.shape != t_l.shape:
            odd, shape = ("s", s_l.shape) if s_l.shape != t_l.shape else ("g", g_l.shape)
            raise ValueError(f"{odd}[{i}] has shape {list(shape)} but t[{i}] has shape "
                             f"{list(t_l.shape)}; a layer's t, s and g must match")
        channels = t_l.shape[1]
        for name, v in (("mu", mu_l), ("sigma", sigma_l)):
            if v.shape != (channels,):
                raise ValueError(f"{name}[{i}] must have shape [{channels}] (the channels of "
                                 f"t[{i}]), got {list(v.shape)}")
        if t_l.numel() == 0:
            raise ValueError(f"t[{i}] is empty (shape {list(t_l.shape)})")
        check_same_device([("t[0]", t[0])] + [(f"{n}[{i}]", v) for n, v in zip(_NAMES, layer)])
        if t_l.dtype == torch.float64 or not (t_l.dtype == s_l.dtype == g_l.dtype):
            t_l, s_l, g_l = t_l.float(), s_l.float(), g_l.float()
        if not _same_kernel_layout(t_l, s_l, g_l):
            # One layout for the three: contiguous if one of them is (as always, so that a conv
            # net's rounding does not move), else channels innermost if one of them is, so that
            # a token output's gradient that autograd laid out differently is the only copy.
            innermost = (not any(v.is_contiguous() for v in (t_l, s_l, g_l))
                         and any(channels_innermost(v) for v in (t_l, s_l, g_l)))
            t_l, s_l, g_l = (_in_kernel_layout(v, innermost) for v in (t_l, s_l, g_l))
        for lst, v in zip(out, (t_l.detach(), s_l, g_l.detach(), mu_l.detach().float().contiguous(),
                                sigma_l.detach().float().contiguous())):
            lst.append(v)
    return out


def _same_kernel_layout(*tensors: Tensor) -> bool:
    """Whether all tensors are contiguous, or all store their channels innermost (any rank >= 3;
    :func:`bdfast._utils.channels_innermost`): the kernels read both without a copy."""
    return (all(x.is_contiguous() for x in tensors)
            or all(channels_innermost(x) for x in tensors))


def _in_kernel_layout(x: Tensor, innermost: bool) -> Tensor:
    """``x`` with its channels innermost (``innermost``) or contiguous; a copy only if it is not
    laid out so already."""
    if innermost:
        return x if channels_innermost(x) else x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x.contiguous()


if _extension.loaded():
    def _fake_check_layers(t, s, g, mu, sigma):
        """The shape and dtype checks of csrc/checks.h; returns the number of rows."""
        fake_check(len(t) > 0 and len(s) == len(g) == len(mu) == len(sigma) == len(t),
                   "medic_clone_loss: t, s, g, mu and sigma must be non-empty lists of equal "
                   "length")
        for layer, (t_l, s_l, g_l, mu_l, sigma_l) in enumerate(zip(t, s, g, mu, sigma)):
            fake_check(t_l.dim() >= 2 and s_l.shape == t_l.shape and g_l.shape == t_l.shape,
                       f"medic_clone_loss: t, s and g of layer {layer} must have one shape "
                       "[B, C, *spatial]")
            fake_check(t_l.dtype in FLOAT_DTYPES and s_l.dtype == g_l.dtype == t_l.dtype,
                       f"medic_clone_loss: t, s and g of layer {layer} must have one dtype of "
                       "float32, float16 or bfloat16")
            fake_check(mu_l.shape == sigma_l.shape == (t_l.shape[1],)
                       and mu_l.dtype == sigma_l.dtype == torch.float32,
                       f"medic_clone_loss: mu and sigma of layer {layer} must be float32 vectors "
                       "of length C")
        return sum(t_l.shape[0] for t_l in t)

    @torch.library.register_fake("bdfast::medic_clone_loss")
    def _(t, s, g, mu, sigma, tau, eps, signed_scores):
        rows = _fake_check_layers(t, s, g, mu, sigma)
        return (s[0].new_empty((), dtype=torch.float32),
                s[0].new_empty((rows, 4), dtype=torch.float32))

    @torch.library.register_fake("bdfast::medic_clone_loss_backward")
    def _(grad_loss, t, s, g, mu, sigma, row_stats, tau, eps, signed_scores):
        rows = _fake_check_layers(t, s, g, mu, sigma)
        fake_check(grad_loss.numel() == 1, "medic_clone_loss_backward: grad_loss must hold one "
                                           f"value, got shape {list(grad_loss.shape)}")
        fake_check(row_stats.shape == (rows, 4) and row_stats.dtype == torch.float32,
                   f"medic_clone_loss_backward: row_stats must be the forward's float32 "
                   f"[{rows}, 4] tensor, got {row_stats.dtype} {list(row_stats.shape)}")
        return [torch.empty_like(s_l) for s_l in s]

    def _setup_context(ctx, inputs, output):
        t, s, g, mu, sigma, tau, eps, signed_scores = inputs
        ctx.save_for_backward(*t, *s, *g, *mu, *sigma, output[1])
        ctx.num_layers = len(t)
        ctx.options = (tau, eps, signed_scores)
        ctx.mark_non_differentiable(output[1])

    def _backward(ctx, grad_loss, _grad_row_stats):
        # Grad mode is on in a backward only with create_graph=True, i.e. when the caller wants
        # to differentiate the gradient again, which the backward kernel cannot provide.
        if torch.is_grad_enabled():
            raise RuntimeError("medic_clone_loss: the native kernels have no second derivative, "
                               "so backward(create_graph=True) through them is not supported; "
                               "use backend='reference' for double backward")
        saved, n = ctx.saved_tensors, ctx.num_layers
        t, s, g, mu, sigma = (list(saved[i * n:(i + 1) * n]) for i in range(5))
        grad_s = torch.ops.bdfast.medic_clone_loss_backward(
            grad_loss, t, s, g, mu, sigma, saved[-1], *ctx.options)
        no_grad = [None] * n
        return no_grad, grad_s, no_grad, no_grad, no_grad, None, None, None

    torch.library.register_autograd("bdfast::medic_clone_loss", _backward,
                                    setup_context=_setup_context)
