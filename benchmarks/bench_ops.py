"""Speed of the fused ops: native kernels against the pure-PyTorch reference, eager and compiled.

Each benchmark group is one case on one device; its variants run on the same inputs, and
``benchmarks/summarize.py`` prints every variant's time relative to the native kernel.
Run with ``make bench`` (or ``pytest benchmarks --benchmark-only``); CUDA cases skip without a GPU.
"""
from __future__ import annotations

import pytest
import torch

from bdfast import ops, reference
from bdfast.ops import _extension

# Hooked conv and BN outputs (C, H, W) of WRN-16-1 on 32x32 inputs: 25 layers.
WRN16_1 = [(16, 32, 32)] * 10 + [(32, 16, 16)] * 8 + [(64, 8, 8)] * 7

# Conv and BN outputs of a CIFAR ResNet-18 in forward order (the released code's conv+BN
# hooks): 40 layers, 1,228,800 elements per sample.
RESNET18 = (
    [(64, 32, 32)] * 2        # stem conv1, bn1
    + [(64, 32, 32)] * 8      # layer1: 2 BasicBlocks x (conv1, bn1, conv2, bn2)
    + [(128, 16, 16)] * 10    # layer2: the same 8, plus the 1x1 shortcut conv and its BN
    + [(256, 8, 8)] * 10      # layer3
    + [(512, 4, 4)] * 10      # layer4
)

# Hooked token outputs (L, C) of two ViT-Ti/16 encoder blocks on 224x224 inputs (197 tokens
# of width 192): attention, GELU of the MLP's first Linear, the MLP's second Linear. MEDIC
# hands them to the op as [B, C, L] views of the [B, L, C] outputs (channels innermost).
VIT_TINY = [(197, 192), (197, 768), (197, 192)] * 2

# case -> (layer shapes, batch per device, token layout). ResNet-18 at batch 128 needs ~10 GB
# and minutes per reference step on a 2-core CPU, so the CPU runs it at batch 16.
MEDIC_CASES = {
    "wrn16_1": (WRN16_1, {"cpu": 64, "cuda": 64}, False),
    "resnet18": (RESNET18, {"cpu": 16, "cuda": 128}, False),
    "vit_tiny_tokens": (VIT_TINY, {"cpu": 64, "cuda": 64}, True),
}

# BatchNorm channels of CIFAR ResNet-18 in forward order (20 layers, 4,800 columns), and the
# spatial size of each BN input, over which DDE takes the per-sample maximum.
RESNET18_BN = [(64, 1024)] * 5 + [(128, 256)] * 5 + [(256, 64)] * 5 + [(512, 16)] * 5
DDE_SAMPLES = 500

_compiled_reference = torch.compile(reference.medic_clone_loss, dynamic=False)
MEDIC_VARIANTS = {
    "native": lambda *args: ops.medic_clone_loss(*args, backend="native"),
    "reference": reference.medic_clone_loss,
    "compile(reference)": _compiled_reference,
}


def _tag(benchmark, op, case, device, variant, **extra):
    benchmark.group = f"{op} {case} {device.type}"
    benchmark.extra_info.update(op=op, case=case, device=device.type, variant=variant, **extra)


def _require_native(op, variant, device):
    if variant == "native" and not _extension.has_kernel(op, device.type):
        pytest.skip(f"no native {device.type} kernel for {op} in this build")


def medic_inputs(shapes, batch, device, seed=0, tokens=False):
    """Teacher/student activations, teacher gradients and channel statistics of every layer;
    with ``tokens``, each shape is (L, C) and t, s, g are [B, C, L] views of [B, L, C] tensors."""
    gen = torch.Generator(device=device).manual_seed(seed)
    t, s, g, mu, sigma = [], [], [], [], []
    for shape in shapes:
        t_l = torch.randn(batch, *shape, generator=gen, device=device)
        s_l = (t_l + 0.1 * torch.randn(t_l.shape, generator=gen, device=device)).requires_grad_()
        g_l = 1e-3 * torch.randn(t_l.shape, generator=gen, device=device)
        if tokens:
            t_l, s_l, g_l = (x.movedim(-1, 1) for x in (t_l, s_l, g_l))
        t.append(t_l)
        s.append(s_l)
        g.append(g_l)
        dims = [0] + list(range(2, t_l.dim()))
        mu.append(t_l.mean(dims))
        sigma.append(t_l.std(dims))
    return t, s, g, mu, sigma


@pytest.mark.parametrize("variant", list(MEDIC_VARIANTS))
@pytest.mark.parametrize("case", list(MEDIC_CASES))
def bench_medic_clone_loss(benchmark, device, sync, copy_bandwidth, case, variant):
    """Forward + backward (gradient w.r.t. the student activations) over all hooked layers."""
    _require_native("medic_clone_loss", variant, device)
    shapes, batches, tokens = MEDIC_CASES[case]
    batch = batches[device.type]
    t, s, g, mu, sigma = medic_inputs(shapes, batch, device, tokens=tokens)
    loss_fn = MEDIC_VARIANTS[variant]

    def step():
        loss = loss_fn(t, s, g, mu, sigma)
        grads = torch.autograd.grad(loss, s)
        sync()
        return grads

    step()
    step()  # compiles the torch.compile variant outside the timing
    elements = sum(x.numel() for x in t)
    # The performance contract: t, s and g read at most twice, the gradient written once.
    traffic = (2 * 3 + 1) * elements * t[0].element_size()
    _tag(benchmark, "medic_clone_loss", f"{case} B={batch}", device, variant,
         layers=len(shapes), elements_per_tensor=elements, bytes_moved=traffic)
    benchmark(step)
    if benchmark.stats is None:  # --benchmark-disable: step ran once, untimed
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(achieved_GBps=traffic / median / 1e9,
                                copy_GBps=copy_bandwidth / 1e9,
                                bandwidth_share=traffic / median / copy_bandwidth)


def dde_activations(device, seed=0):
    """DDE's X [500, 4800]: per-sample spatial maxima of ResNet-18's BN inputs, packed.

    The maximum of S Gaussian positions is drawn exactly as Phi^-1(U^(1/S)); every channel has
    its own location and scale, and a few "backdoor" channels fire strongly on the 10% of
    samples that carry a trigger, which makes them bimodal (low entropy).
    """
    gen = torch.Generator().manual_seed(seed)
    columns, offsets = [], [0]
    for channels, spatial in RESNET18_BN:
        u = torch.rand(DDE_SAMPLES, channels, generator=gen, dtype=torch.float64)
        peak = torch.special.ndtri(u.pow(1.0 / spatial))
        loc = torch.randn(channels, generator=gen, dtype=torch.float64)
        scale = torch.rand(channels, generator=gen, dtype=torch.float64).mul(2).exp()
        x = loc + scale * peak
        backdoor = torch.randperm(channels, generator=gen)[:max(1, channels // 100)]
        poisoned = torch.rand(DDE_SAMPLES, generator=gen) < 0.1
        x[poisoned.nonzero(), backdoor] += 6 * scale[backdoor]
        columns.append(x)
        offsets.append(offsets[-1] + channels)
    x = torch.cat(columns, dim=1).float().to(device)
    return x, torch.tensor(offsets, device=device)


@pytest.mark.parametrize("estimator, variant", [
    ("compat", "native"), ("compat", "per-bin loop"), ("default", "native"),
    ("default", "reference")])
def bench_histogram_entropy(benchmark, device, sync, estimator, variant):
    """Both estimators; ``reference_compat=True`` against the released code's per-bin loop (the
    reference)."""
    _require_native("histogram_entropy", variant, device)
    x, offsets = dde_activations(device)
    _tag(benchmark, "histogram_entropy", f"{estimator} 500x4800", device, variant)
    compat = estimator == "compat"
    backend = "native" if variant == "native" else "reference"

    def run():
        h = ops.histogram_entropy(x, offsets, reference_compat=compat, backend=backend)
        sync()
        return h

    if variant == "per-bin loop":  # about one bin per 0.01 standard deviations: seconds a call
        benchmark.pedantic(run, rounds=1 if device.type == "cpu" else 3, iterations=1,
                           warmup_rounds=0 if device.type == "cpu" else 1)
    else:
        benchmark(run)


def bn_statistics(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = sum(c for c, _ in RESNET18_BN)
    mu_q, var_q = torch.randn(k, generator=gen), torch.rand(k, generator=gen) + 0.1
    mu_p = mu_q + 0.1 * torch.randn(k, generator=gen)
    var_p = var_q * (1 + 0.1 * torch.randn(k, generator=gen)).abs()
    return [v.to(device) for v in (mu_p, var_p, mu_q, var_q)]


@pytest.mark.parametrize("variant", ["native", "reference"])
def bench_gaussian_kl(benchmark, device, sync, variant):
    _require_native("gaussian_kl", variant, device)
    stats = bn_statistics(device)
    _tag(benchmark, "gaussian_kl", "K=4800", device, variant)

    def run():
        kl = ops.gaussian_kl(*stats, backend=variant)
        sync()
        return kl

    benchmark(run)


@pytest.mark.parametrize("variant", ["native", "reference"])
def bench_layer_outliers(benchmark, device, sync, variant):
    _require_native("layer_outliers", variant, device)
    mu_p, var_p, mu_q, var_q = bn_statistics(device)
    scores = ops.gaussian_kl(mu_p, var_p, mu_q, var_q, backend="reference")
    offsets = torch.tensor([0] + [c for c, _ in RESNET18_BN], device=device).cumsum(0)
    _tag(benchmark, "layer_outliers", "K=4800 L=20", device, variant)

    def run():
        mask = ops.layer_outliers(scores, offsets, u=3.0, direction="high", backend=variant)
        sync()
        return mask

    benchmark(run)
