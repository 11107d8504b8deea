"""Speed of one whole MEDIC training step on WRN-16-1 (batch 64, random CIFAR-shaped data).

A step is: teacher forward + proxy gradients g, student forward and backward through
CE + lam * clone loss, and the Adam step. Variants, all on the same models and batch:

- ``native``: bdfast's step (:class:`bdfast.defenses.medic.MedicStep`): one teacher forward with the
  hooked outputs in the graph, ``torch.autograd.grad`` w.r.t. them only, one student forward,
  one backward, the fused ``medic_clone_loss`` kernel;
- ``reference``: the same step with the pure-PyTorch loss (what the kernel saves);
- ``released-style``: the step as the authors' code does it: batch-mean CE, one full backward
  through both nets (teacher parameter gradients included) with ``retain_graph``, a second
  backward for the clone loss, and a per-layer Python loop that materialises the softmaxes;
- ``native bf16`` (CUDA only): bdfast's default on a GPU, bfloat16 autocast;
- ``native cached``: a step of a later epoch with the teacher cache (``cache_teacher``): t, g and
  the labels looked up by the images' fingerprints instead of the teacher's forward and
  gradients;
- ``native channels_last``: ``native`` with both nets and the batch in channels-last layout.

All variants hook the paper's layers (conv + norm + linear) and compute in float32 unless named.
``benchmarks/summarize.py`` prints each variant's time relative to ``native``.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bdfast.ops import _extension
from bdfast.hooks import select_layers
from bdfast.defenses.medic import MedicConfig, MedicStep, teacher_statistics
from bdfast.lab.models import wrn16_1
from bdfast.defenses.teacher_cache import TeacherCache

BATCH = 64
VARIANTS = ["native", "reference", "released-style", "native bf16", "native cached",
            "native channels_last"]


def _setup(device: torch.device):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    teacher = wrn16_1().to(device).eval()
    student = wrn16_1().to(device).train()
    x = torch.rand(BATCH, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (BATCH,), generator=gen).to(device)
    names = select_layers(teacher)
    mu, sigma = teacher_statistics(teacher, names, [x], device=device)
    return teacher, student, names, mu, sigma, x, y


def _bdfast_step(teacher, student, names, mu, sigma, x, y, backend, amp_dtype, cached=False):
    teacher = copy.deepcopy(teacher).requires_grad_(False)
    cache = TeacherCache("auto", budget=1 << 40) if cached else None
    step = MedicStep(teacher, student, names, mu, sigma, MedicConfig(backend=backend),
                     cache=cache)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2, weight_decay=1e-4)
    device = x.device
    epoch = 0
    if cached:  # epoch 1 fills the cache; the timed steps are those of later epochs
        step(student, x, y, 0)
        epoch = 1

    def run():
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            loss = step(student, x, y, epoch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return run


def released_step(teacher, student, names, mu, sigma, tau=5.0, lam=10.0, eps=1e-5):
    """``step(x, y, optimizer)``: one training step written the way the released MEDIC code
    does it (also used by ``bench_medic_run.py`` for whole runs). Batch-mean CE on both nets,
    one full backward through both (the teacher's parameter gradients included) with
    ``retain_graph`` to get t.grad, then a per-layer Python loop that materialises the signed
    softmaxes and a second backward for the clone loss. Returns the clone loss."""
    teacher = copy.deepcopy(teacher).requires_grad_(True)  # the released code does not freeze it
    t_mods = [dict(teacher.named_modules())[n] for n in names]
    s_mods = [dict(student.named_modules())[n] for n in names]
    # By name: execution order differs from ``names`` (a block's shortcut conv runs first).
    t_acts, s_acts = {}, {}

    def keep(store, retain, name):
        def hook(module, inputs, output):
            if retain:
                output.retain_grad()
            store[name] = output
        return hook

    for name, m in zip(names, t_mods):
        m.register_forward_hook(keep(t_acts, True, name))
    for name, m in zip(names, s_mods):
        m.register_forward_hook(keep(s_acts, False, name))

    def step(x, y, opt):
        t_acts.clear()
        s_acts.clear()
        opt.zero_grad(set_to_none=True)
        teacher.zero_grad(set_to_none=True)
        logits_t, logits_s = teacher(x), student(x)
        ce = F.cross_entropy(logits_s, y) + F.cross_entropy(logits_t, y)  # batch means
        ce.backward(retain_graph=True)  # fills t.grad, and the teacher's parameter grads
        clone = 0.0
        for name, m, sd in zip(names, mu, sigma):
            t, s = t_acts[name], s_acts[name]
            view = (1, -1) + (1,) * (t.dim() - 2)
            sig = sd.view(view) + eps
            z = (t.detach() - m.view(view)) / sig
            q = sd.view(view) * t.grad
            a = torch.softmax(tau * z.flatten(1), dim=1)
            p = torch.softmax(tau * q.flatten(1), dim=1)
            w = torch.sqrt(a * p).view_as(t)
            clone = clone + (w * ((t.detach() - s) / sig) ** 2).sum() / len(x)
        (lam * clone).backward()
        opt.step()
        return clone
    return step


def _released_step(teacher, student, names, mu, sigma, x, y):
    step = released_step(teacher, student, names, mu, sigma)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2, weight_decay=1e-4)
    return lambda: step(x, y, opt)


@pytest.mark.parametrize("variant", VARIANTS)
def bench_medic_step(benchmark, device, sync, variant):
    """One training step; the group compares the variants on one device."""
    if variant == "native bf16" and device.type != "cuda":
        pytest.skip("bfloat16 autocast is bdfast's default on CUDA only")
    if variant.startswith("native") and not _extension.has_kernel("medic_clone_loss", device.type):
        pytest.skip(f"no native {device.type} kernel for medic_clone_loss in this build")
    teacher, student, names, mu, sigma, x, y = _setup(device)
    if variant == "native channels_last":
        teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
        x = x.contiguous(memory_format=torch.channels_last)
    if variant == "released-style":
        step = _released_step(teacher, student, names, mu, sigma, x, y)
    else:
        backend = "reference" if variant == "reference" else "native"
        amp = torch.bfloat16 if variant == "native bf16" else None
        step = _bdfast_step(teacher, student, names, mu, sigma, x, y, backend, amp,
                            cached=variant == "native cached")

    def run():
        out = step()
        sync()
        return out

    benchmark.group = f"medic_step wrn16_1 B={BATCH} {device.type}"
    benchmark.extra_info.update(op="medic_step", case=f"wrn16_1 B={BATCH}", device=device.type,
                                variant=variant, layers=len(names))
    if device.type == "cpu":  # a step takes a good fraction of a second on a 2-core CPU
        benchmark.pedantic(run, rounds=8, iterations=1, warmup_rounds=2)
    else:
        benchmark(run)
