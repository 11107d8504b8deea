"""MEDIC end to end: the training step, labels, bad input, the teacher left alone and
torch.distributed (its efficacy on the lab's backdoored models is in test_efficacy.py)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import bdfast
from bdfast.ops import _extension
from bdfast.defenses.medic import Medic, medic_clone
from bdfast.lab.models import digits_cnn

FAST = dict(epochs=1, progress=False, seed=0, amp=False)


@pytest.fixture(scope="module")
def small(digits):
    """A digits CNN teacher (untrained weights are enough for the mechanics) and 48 images."""
    torch.manual_seed(0)
    return digits_cnn().eval(), digits.clean[0][:48], digits.clean[1][:48]


def snapshot(model: nn.Module):
    """Everything about a model that a defense must not change."""
    return (copy.deepcopy(model.state_dict()),
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: (m.training, getattr(m, "inplace", None), len(m._forward_hooks))
             for n, m in model.named_modules()})


def assert_same(before, after):
    state_a, grad_a, flags_a = before
    state_b, grad_b, flags_b = after
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k
    assert grad_a == grad_b and flags_a == flags_b


@pytest.mark.skipif(not _extension.has_kernel("medic_clone_loss", "cpu"),
                    reason="the native CPU kernel is not built")
def test_one_step_native_equals_reference(small):
    teacher, x, y = small
    loader = [(x[:32], y[:32])]  # one step
    results = {b: Medic(**FAST, backend=b).fit(teacher, loader) for b in ("native", "reference")}
    native, ref = results["native"], results["reference"]
    assert native.history[0]["loss"] == pytest.approx(ref.history[0]["loss"], rel=1e-5)
    for (name, a), (_, b) in zip(native.model.state_dict().items(),
                                 ref.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    # The step moved the re-initialised student.
    fresh = Medic(**FAST, lr=1e-12).fit(teacher, loader).model
    assert not torch.equal(fresh.classifier.weight, native.model.classifier.weight)


def test_unlabeled_loader_uses_the_teacher_labels(small):
    teacher, x, y = small
    images_only = [x[:24], x[24:]]
    with_labels = [(x[:24], y[:24]), (x[24:], y[24:])]
    a = medic_clone(teacher, images_only, **FAST)
    b = medic_clone(teacher, with_labels, labels="teacher", **FAST)
    c = medic_clone(teacher, with_labels, **FAST)  # "auto" takes the given labels
    for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, msg=name)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_bad_input_fails_clearly_and_leaves_the_teacher_alone(small):
    teacher, x, y = small
    before = snapshot(teacher)
    with pytest.raises(ValueError, match="labels='given'.*without labels"):
        medic_clone(teacher, [x[:16]], labels="given", **FAST)
    with pytest.raises(ValueError, match="loader is empty"):
        medic_clone(teacher, [], **FAST)
    with pytest.raises(TypeError, match="re-iterable"):
        medic_clone(teacher, (b for b in [x[:16]]), **FAST)
    with pytest.raises(ValueError, match="batch 1 of the loader must hold a non-empty float"):
        medic_clone(teacher, [x[:16], (x[:16] * 255).long()], **FAST)
    with pytest.raises(ValueError, match=r"labels of batch 0.*class indices in \[0, 10\)"):
        medic_clone(teacher, [(x[:16], y[:16] + 10)], **FAST)
    for option, value in (("epochs", 0), ("labels", "true"), ("tau", float("nan")),
                          ("lr", 0.0), ("amp", "fp8"), ("backend", "cuda")):
        with pytest.raises(ValueError, match=option):
            medic_clone(teacher, [x[:16]], **{**FAST, option: value})
    # A huge clone weight overflows float32 in the first step: the run stops and says where.
    with pytest.raises(FloatingPointError, match="non-finite at epoch 1, step 1"):
        medic_clone(teacher, [(x[:16], y[:16])], lam=1e38, **FAST)
    assert_same(before, snapshot(teacher))


def test_module_without_reset_parameters_needs_student(small):
    teacher, x, _ = small

    class Scaled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.inner(x) * self.scale

    model = Scaled(copy.deepcopy(teacher))
    with pytest.raises(TypeError, match="the model itself .*Scaled.* no reset_parameters"):
        medic_clone(model, [x[:16]], **FAST)
    torch.manual_seed(1)
    student = Scaled(digits_cnn())
    out = medic_clone(model, [x[:16]], student=student, **FAST)
    assert out is not student and isinstance(out, Scaled)


def test_teacher_untouched_history_and_seed_reproducibility(small):
    teacher, x, y = small
    teacher = copy.deepcopy(teacher).train()  # modes, inplace flags and grads must survive
    teacher.features[0].weight.requires_grad_(False)
    before = snapshot(teacher)
    calls = []
    loader = [(x[:24], y[:24]), (x[24:], y[24:])]
    options = dict(FAST, epochs=3, eval_every=2, eval_fn=lambda m, e: calls.append(e) or e * 10)
    first = Medic(**options).fit(teacher, loader)
    second = medic_clone(teacher, loader, **options)
    assert_same(before, snapshot(teacher))
    for (name, a), b in zip(first.model.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert calls == [2, 3, 2, 3]
    assert [h["epoch"] for h in first.history] == [1, 2, 3]
    assert [h.get("eval") for h in first.history] == [None, 20, 30]
    assert not first.model.training and first.layers[-1] == "classifier"
    assert set(first.timings) == {"prepare", "statistics", "train", "eval", "guard", "total"}


def test_reference_compat_and_released_layers_run(small):
    teacher, x, y = small
    result = Medic(**FAST, reference_compat=True, layers="conv+bn").fit(teacher, [(x, y)])
    assert "classifier" not in result.layers and len(result.layers) == 8
    assert torch.isfinite(torch.tensor(result.history[0]["loss"]))


# Acceptance: ASR <= 0.10 and clean accuracy >= original - 0.03 on the digits test split.
DDP_WORKER = """
import os, sys, torch, torch.distributed as dist
from bdfast.defenses.bcu import bcu_cleanse
from bdfast.defenses.medic import medic_clone
from bdfast.lab.models import digits_cnn
rank, path = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + path, rank=rank, world_size=2)
torch.manual_seed(0)
teacher = digits_cnn().eval()
x = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(rank))  # a shard per rank
options = dict(epochs=1, progress=False, amp=False, seed=rank)  # different seeds: DDP must sync
for model in (medic_clone(teacher, [x[:8], x[8:]], **options),
              bcu_cleanse(teacher, [x[:8], x[8:]], **options)):
    w = torch.cat([p.detach().flatten() for p in model.parameters()])
    both = [torch.empty_like(w) for _ in range(2)]
    dist.all_gather(both, w)
    assert torch.equal(both[0], both[1]), "the ranks trained different models"
dist.destroy_process_group()
print("ok", flush=True)
# Skip interpreter finalisation: gloo's worker threads can still be joinable there and abort
# the process ("terminate called without an active exception") after the work is checked.
os._exit(0)
"""


def test_two_ddp_ranks_train_one_model(tmp_path):
    """Under torchrun-style DDP (2 CPU ranks, gloo) both defenses end with the same model on
    every rank, although each rank sees other data and seeds its own initialisation."""
    store = str(tmp_path / "store")
    root = os.path.dirname(os.path.dirname(os.path.abspath(bdfast.__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    procs = [subprocess.Popen([sys.executable, "-c", DDP_WORKER, str(r), store], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0 and out.strip() == "ok", (out[-500:], err[-2000:])


class FlattensWithView(nn.Module):
    """A user model whose forward cannot run channels-last: ``.view`` of a 4 x 4 feature map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=4, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.view(h.shape[0], -1))


@pytest.mark.parametrize("cache", [False, True])
def test_channels_last_is_the_same_math_and_hands_back_a_contiguous_model(small, cache):
    teacher, x, y = small
    before = snapshot(teacher)
    loader = [(x[:32], y[:32])]  # one step: its loss comes before any update
    runs = {layout: Medic(**dict(FAST, epochs=2), channels_last=layout,
                          cache_teacher=cache).fit(teacher, loader)
            for layout in (False, True, "auto")}
    assert [runs[k].channels_last for k in (False, True, "auto")] == [False, True, True]
    assert runs[True].history[0]["loss"] == pytest.approx(runs[False].history[0]["loss"],
                                                          rel=1e-5)
    assert runs[True].history[1]["loss"] == runs["auto"].history[1]["loss"]
    if cache:  # epoch 2 read the channels-last rows back
        assert runs[True].cache["hits"] == 32
    for run in runs.values():
        assert all(p.is_contiguous() for p in run.model.parameters())
    assert_same(before, snapshot(teacher))
    assert all(p.is_contiguous() for p in teacher.parameters())


def test_channels_last_auto_falls_back_for_a_model_that_cannot_run_it(small):
    _, x, y = small
    torch.manual_seed(0)
    teacher = FlattensWithView().eval()
    with pytest.raises(RuntimeError):  # the premise: this forward fails channels-last
        teacher.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last))
    teacher.to(memory_format=torch.contiguous_format)
    run = Medic(**FAST).fit(teacher, [(x, y)])
    assert not run.channels_last and len(run.history) == 1
    with pytest.raises(ValueError, match="channels_last=True.*channels-last layout"):
        Medic(**FAST, channels_last=True).fit(teacher, [(x, y)])
    with pytest.raises(ValueError, match="channels_last must be"):
        Medic(**FAST, channels_last="yes")


class NarrowStridedShortcut(nn.Module):
    """The smallest net with the layer whose channels-last CPU backward torch 2.14.1 gets wrong
    (memory corruption with oneDNN's AVX2 kernels): a 1x1, stride-2 convolution from 4 to 8
    channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.shortcut = nn.Conv2d(4, 8, 1, stride=2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.shortcut(torch.relu(self.stem(x))).mean((2, 3)))


def test_channels_last_auto_avoids_the_torch_crash_on_narrow_strided_1x1_convs(small):
    from bdfast.defenses.medic import _memory_format, channels_last_crash_layers
    _, x, y = small
    net = NarrowStridedShortcut()
    assert channels_last_crash_layers(net) == ["shortcut"]
    wider = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 16, 1, stride=2),
                          nn.Conv2d(16, 16, 1, stride=2, groups=4), nn.Conv2d(16, 4, 1))
    assert channels_last_crash_layers(wider) == ["2"]  # 4 input channels per group
    run = Medic(**FAST).fit(net, [(x, y)])
    assert not run.channels_last
    with pytest.warns(RuntimeWarning, match="channels_last=True.*'shortcut'.*crashed"):
        assert _memory_format(True, copy.deepcopy(net), copy.deepcopy(net),
                              x) == torch.channels_last


CRASH_RUN = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_medic import NarrowStridedShortcut
from bdfast.defenses.medic import Medic
torch.set_num_threads(1)
torch.manual_seed(0)
x = torch.rand(160, 1, 16, 16)
loader = [(x[i:i + 16], torch.randint(0, 10, (16,))) for i in range(0, 160, 16)]
run = Medic(epochs=20, progress=False, seed=0, amp=False).fit(NarrowStridedShortcut(), loader)
print("ok", run.channels_last)
"""


def test_medic_defaults_survive_the_smallest_crashing_layer():
    """200 training steps with defaults on the reproducer, in a subprocess: channels-last there
    ended in 'double free or corruption' (or a segfault) on this repository's AVX2 CPU."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(bdfast.__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-c", CRASH_RUN, os.path.dirname(__file__)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["ok", "False"], done.stderr[-2000:]


class CountsPasses:
    """A re-iterable loader that counts how often an iteration starts."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


@pytest.mark.parametrize("layout", [False, "auto"])
def test_one_pass_for_the_first_batch_one_for_statistics_one_per_epoch(small, layout):
    # Each pass of a shuffling loader draws a new order, so an extra pass would shift every
    # epoch's batches.
    teacher, x, y = small
    loader = CountsPasses([(x[:16], y[:16]), (x[16:32], y[16:32])])
    Medic(**dict(FAST, epochs=3), channels_last=layout, cache_teacher=False).fit(teacher, loader)
    # The collapse guard's pass comes after the last epoch and puts the loader's generators back
    # (tests/defenses/test_collapse_guard.py), so it shifts no epoch.
    assert loader.passes == 1 + 1 + 3 + 1
