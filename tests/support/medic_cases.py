"""Inputs and checks shared by the CPU and CUDA parity tests of ``medic_clone_loss``.

The tolerances of docs/ops.md, as relative errors of the whole output: < 1e-4 for float32 inputs and
< 1e-2 for 16-bit inputs, whose reference is evaluated in float64 on the same rounded values.
The loss is compared as a scalar and the student gradient layer by layer.
"""
from __future__ import annotations

import torch

from bdfast import ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 on the CPU."""
    out = torch.as_tensor(out).detach().double().cpu()
    ref = torch.as_tensor(ref).detach().double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def make_layer(shape, dtype=torch.float32, *, device="cpu", seed=0, dead=(),
               channels_last=False, innermost=False, misaligned=False):
    """One hooked layer: teacher t, student s (needs grad), teacher gradient g, and mu, sigma.

    mu and sigma are the per-channel statistics of t, as MEDIC measures them on clean data;
    the channels in ``dead`` are constant zero in t with sigma = 0 (a dead ReLU channel).
    ``innermost`` stores t, s and g with their channels innermost in any rank, as
    ``y.movedim(-1, 1)`` of a contiguous token output ``y [B, L, C]`` is.
    ``misaligned`` stores t, s and g one element past a 16-byte boundary (the CUDA kernels'
    scalar path).
    """
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen) * 1.5 + 0.2
    for c in dead:
        t[:, c] = 0.0
    s = t + 0.5 * torch.randn(shape, generator=gen)
    g = 0.05 * torch.randn(shape, generator=gen)
    dims = [0] + list(range(2, len(shape)))
    mu = t.mean(dims)
    sigma = t.std(dims) if t[:, 0].numel() > 1 else torch.full_like(mu, 0.7)
    for c in dead:
        mu[c], sigma[c] = 0.0, 0.0

    def place(x):
        x = x.to(device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if innermost:
            x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        if misaligned:  # the same strides, one element into a fresh buffer
            moved = x.new_zeros(x.numel() + 1)[1:].as_strided(x.shape, x.stride())
            x = moved.copy_(x)
        return x

    return place(t), place(s).requires_grad_(), place(g), mu.to(device), sigma.to(device)


def unzip(layers):
    return tuple(list(parts) for parts in zip(*layers))


def reference64(t, s, g, mu, sigma, **options):
    """Loss and student gradients of the reference evaluated in float64 on the same inputs."""
    s64 = [x.detach().double().requires_grad_() for x in s]
    loss = reference.medic_clone_loss([x.detach().double() for x in t], s64,
                                      [x.detach().double() for x in g],
                                      [m.double() for m in mu], [v.double() for v in sigma],
                                      **options)
    return loss.detach(), list(torch.autograd.grad(loss, s64))


def native(t, s, g, mu, sigma, **options):
    """Loss and student gradients of the compiled kernel on s's device (autograd backward)."""
    s = [x.detach().clone().requires_grad_() for x in s]  # clone keeps channels_last
    loss = ops.medic_clone_loss(t, s, g, mu, sigma, backend="native", **options)
    loss.backward()
    return loss.detach(), [x.grad for x in s]


def assert_matches_reference(layers, tol, **options):
    """The kernel's loss and gradients against the float64 reference; returns the kernel's."""
    t, s, g, mu, sigma = unzip(layers)
    loss, grads = native(t, s, g, mu, sigma, **options)
    loss_ref, grads_ref = reference64(t, s, g, mu, sigma, **options)
    assert loss.device == s[0].device and loss.dtype == torch.float32 and loss.dim() == 0
    assert rel_err(loss, loss_ref) < tol, (float(loss), float(loss_ref))
    for i, (gr, ref) in enumerate(zip(grads, grads_ref)):
        assert gr.shape == s[i].shape and gr.dtype == s[i].dtype and gr.device == s[i].device
        assert rel_err(gr, ref) < tol, f"layer {i}: {rel_err(gr, ref)}"
    return loss, grads
