"""Runs every bdfast CUDA kernel once on tiny inputs, for compute-sanitizer.

    compute-sanitizer --tool memcheck --kernel-name kns=bdfast --report-api-errors no \\
        --error-exitcode 1 python tests/support/sanitize_ops.py
    (the same with --tool racecheck; scripts/gpu_check.sh runs both)

The inputs are small (the sanitizer slows kernels down a hundredfold) but reach every code path:
medic_clone_loss forward and backward with absolute and signed scores, float32 / float16 /
bfloat16, the 16-byte and the scalar (misaligned) loads, contiguous and channels_last layouts,
one-tile rows and a row split over tiles (the cross-block merge), and more layers than one launch
holds; histogram_entropy in both modes with constant and NaN columns and a step small enough for
several shared-memory passes; gaussian_kl with mixed dtypes; layer_outliers with NaN and empty
layers. It exits non-zero if an output is not finite where it must be.
"""
import sys

import torch

import bdfast  # noqa: F401  (loads the extension)

DEVICE = "cuda"
ARGS = (5.0, 1e-5)


def layer(shape, dtype, *, channels_last=False, misaligned=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for scale in (1.0, 1.0, 0.05):
        x = (scale * torch.randn(shape, generator=gen)).to(DEVICE, dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if misaligned:
            x = x.new_zeros(x.numel() + 1)[1:].as_strided(x.shape, x.stride()).copy_(x)
        out.append(x)
    channels = shape[1]
    return (*out, torch.rand(channels, generator=gen).to(DEVICE),
            (0.5 + torch.rand(channels, generator=gen)).to(DEVICE))


def medic(layers, signed) -> bool:
    """Forward and backward; True when the loss and every gradient are finite."""
    t, s, g, mu, sigma = (list(part) for part in zip(*layers))
    loss, stats = torch.ops.bdfast.medic_clone_loss(t, s, g, mu, sigma, *ARGS, signed)
    grads = torch.ops.bdfast.medic_clone_loss_backward(torch.ones((), device=DEVICE), t, s, g,
                                                       mu, sigma, stats, *ARGS, signed)
    return bool(torch.isfinite(loss)) and all(bool(torch.isfinite(x).all()) for x in grads)


def main() -> int:
    ok = True
    layers = [
        layer((2, 4, 3, 3), torch.float32),                            # 16-byte loads
        layer((2, 3, 5, 7), torch.float16, misaligned=True, seed=1),   # scalar loads
        layer((2, 6, 4, 4), torch.bfloat16, channels_last=True, seed=2),
        layer((1, 4, 70, 70), torch.float32, seed=3),                  # 19,600: two tiles
        layer((2, 5), torch.float32, seed=4),                          # linear layer
        layer((1, 1), torch.float16, seed=5),                          # one element
    ]
    for signed in (False, True):
        ok &= medic(layers, signed)
    # 390 layers: two launches sharing the arrival counters.
    ok &= medic([layer((1, 2), torch.float32, seed=10 + i) for i in range(390)], False)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(70, 12, generator=gen)
    x[:, 2] = 1.0                # constant column
    x[5, 3] = float("nan")       # non-finite column
    x = x.to(DEVICE)
    offsets = torch.tensor([0, 4, 4, 12], device=DEVICE)
    for compat in (False, True):
        for step in (0.01, 1e-4):  # 1e-4: more bins than one shared-memory window
            h = torch.ops.bdfast.histogram_entropy(x.to(torch.bfloat16) if compat else x,
                                                   offsets, step, compat)
            ok &= bool(torch.isnan(h[[2, 3]]).all()) and bool(torch.isfinite(h[[0, 1, 4]]).all())

    stats = [torch.rand(33, generator=gen).to(DEVICE, dtype) + 0.1
             for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)]
    ok &= bool(torch.isfinite(torch.ops.bdfast.gaussian_kl(*stats, 1e-5)).all())

    scores = torch.randn(50, generator=gen).to(DEVICE)
    scores[7] = float("nan")
    bounds = torch.tensor([0, 20, 20, 21, 50], device=DEVICE)
    for high in (False, True):
        mask, thresholds = torch.ops.bdfast.layer_outliers(scores, bounds, 1.0, high)
        ok &= not bool(mask[7]) and not bool(mask[20])
        ok &= bool(thresholds[1:3].isnan().all()) and bool(thresholds[[0, 3]].isfinite().all())

    torch.cuda.synchronize()
    print("sanitize_ops:", "ok" if ok else "FAILED (non-finite or unexpected outputs)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
