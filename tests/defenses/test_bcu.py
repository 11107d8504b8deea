"""BCU: the adaptive ratio mapping, the partial re-initialisation, the training and bad input
(its efficacy on the lab's backdoored models is in test_efficacy.py)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from bdfast.defenses.bcu import bcu_cleanse, bcu_fit, bcu_ratios, partial_reinit
from bdfast.lab.models import digits_cnn, preact_resnet18, resnet18_cifar, vgg_small, wrn16_1

FAST = dict(epochs=2, progress=False, seed=0, amp=False)


def _paper_mapping(model: nn.Module, classifier: str):
    """BCU Sec. 4: conv1 0.01; the eight blocks 0.01, 0.01, 0.03, 0.03, 0.09, 0.09, 0.27, 0.27
    (every conv of a block, its 1x1 shortcut included); the classifier 0.1."""
    stage_ratio = {"layer1": 0.01, "layer2": 0.03, "layer3": 0.09, "layer4": 0.27}
    expected = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            expected[name] = (0.01 if name == "conv1" else 0.1 if name == classifier
                              else stage_ratio[name.split(".")[0]])
    return expected


def test_adaptive_ratios_on_resnet18_are_the_papers():
    model = resnet18_cifar().eval()
    ratios = bcu_ratios(model, torch.rand(2, 3, 32, 32))
    assert ratios == _paper_mapping(model, "fc")
    assert ratios["layer2.0.shortcut.0"] == 0.03 and ratios["layer4.1.conv2"] == 0.27
    assert len(ratios) == 21  # conv1, 16 block convs, 3 shortcuts, fc
    # The rule reads the forward pass, not names: the pre-activation variant maps the same way.
    preact = preact_resnet18().eval()
    assert bcu_ratios(preact, torch.rand(2, 3, 32, 32)) == _paper_mapping(preact, "linear")


def test_adaptive_ratios_on_other_depths():
    # Three stages (WRN-16-1's groups, vgg_small's resolutions): 0.01, 0.09, 0.27.
    wrn = bcu_ratios(wrn16_1().eval(), torch.rand(2, 3, 32, 32))
    assert wrn["conv1"] == 0.01 and wrn["fc"] == 0.1
    assert {wrn[f"block{i}.0.conv1"] for i in (1, 2, 3)} == {0.01, 0.09, 0.27}
    vgg = bcu_ratios(vgg_small().eval(), torch.rand(2, 1, 16, 16))
    assert vgg == {"convs.0": 0.01, "convs.1": 0.01, "convs.2": 0.09, "convs.3": 0.09,
                   "convs.4": 0.27, "fc": 0.1}
    # Two stages (the digits CNN: 16x16 and 8x8): 0.03, 0.27. A train-mode model is left as
    # it was (the forward runs in eval mode, so the BN statistics do not move).
    model = digits_cnn().train()
    state = copy.deepcopy(model.state_dict())
    cnn = bcu_ratios(model, torch.rand(2, 1, 16, 16))
    assert cnn == {"features.0": 0.01, "features.3": 0.03, "features.7": 0.27,
                   "features.10": 0.27, "classifier": 0.1}
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_uniform_and_prefix_ratios_and_their_errors():
    model = digits_cnn()
    x = torch.rand(2, 1, 16, 16)
    assert set(bcu_ratios(model, x, "uniform:0.2").values()) == {0.2}
    ratios = bcu_ratios(model, x, {"": 0.05, "features": 0.2, "features.10": 0.5})
    assert ratios == {"features.0": 0.2, "features.3": 0.2, "features.7": 0.2,
                      "features.10": 0.5, "classifier": 0.05}
    with pytest.raises(ValueError, match="ratios must be 'adaptive'"):
        bcu_ratios(model, x, "deep")
    with pytest.raises(ValueError, match=r"ratios='uniform:<p>' must be a number in \[0, 1\]"):
        bcu_ratios(model, x, "uniform:1.5")
    with pytest.raises(ValueError, match="prefix 'feature' names no Conv, Linear or Multi"):
        bcu_ratios(model, x, {"feature": 0.1})


def test_partial_reinit_replaces_a_share_p_and_leaves_norm_layers_alone():
    torch.manual_seed(0)
    teacher = resnet18_cifar()
    for m in teacher.modules():  # non-default BN state, so that a reset would show
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    student = copy.deepcopy(teacher)
    ratios = bcu_ratios(student.eval(), torch.rand(2, 3, 32, 32))
    torch.manual_seed(1)
    replaced = partial_reinit(student, ratios)

    t_modules, s_modules = dict(teacher.named_modules()), dict(student.named_modules())
    for name, m in t_modules.items():
        if isinstance(m, nn.BatchNorm2d):
            for k, v in m.state_dict().items():
                assert torch.equal(v, s_modules[name].state_dict()[k]), f"{name}.{k}"
    for name, p in ratios.items():
        old = torch.cat([q.flatten() for q in t_modules[name].parameters()])  # weight (+ bias)
        new = torch.cat([q.flatten() for q in s_modules[name].parameters()])
        share = (old != new).float().mean().item()
        assert share == pytest.approx(replaced[name], abs=1e-6)
        # Binomial spread: within 5 standard deviations of p (plus a tiny slack).
        tol = 5 * (p * (1 - p) / old.numel()) ** 0.5 + 1e-3
        assert share == pytest.approx(p, abs=tol), name
    # The replaced values come from a fresh initialisation, not a rescaled copy.
    w_old, w_new = t_modules["layer4.1.conv2"].weight, s_modules["layer4.1.conv2"].weight
    changed = w_old != w_new
    bound = 1 / (w_old[0].numel() ** 0.5)  # kaiming_uniform(a=sqrt(5)) of Conv2d
    assert w_new[changed].abs().max() <= bound + 1e-6


@pytest.mark.parametrize("init", ["reset", "kaiming"])
def test_partial_reinit_draws_from_the_chosen_init(init):
    """The replaced values of a conv follow the init's distribution: Kaiming-normal with fan_out
    (std sqrt(2 / fan_out)) or reset_parameters' Kaiming-uniform(a=sqrt(5)), bound
    1/sqrt(fan_in), std bound/sqrt(3). A linear layer is reset either way."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, bias=False), nn.Flatten(), nn.Linear(64, 10))
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(10.0)  # far from any init, so that every replaced value shows
    student = copy.deepcopy(teacher)
    torch.manual_seed(1)
    partial_reinit(student, {"0": 1.0, "2": 1.0}, init=init)
    conv = student[0].weight.double()
    fan_in = fan_out = 64 * 9
    expected = (2 / fan_out) ** 0.5 if init == "kaiming" else (1 / fan_in ** 0.5) / 3 ** 0.5
    assert conv.std().item() == pytest.approx(expected, rel=0.03)
    assert conv.mean().item() == pytest.approx(0, abs=4 * expected / conv.numel() ** 0.5)
    assert student[2].weight.abs().max().item() <= 1 / 64 ** 0.5 + 1e-6


def test_schedule_epochs_sets_the_cosine_horizon(digits, monkeypatch):
    """The lr of epoch e is lr (1 + cos(pi e / E)) / 2 with E = schedule_epochs, or epochs."""
    x = digits.clean[0][:32]
    teacher = digits_cnn().eval()
    used = []
    sgd_step = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return sgd_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    for horizon in (None, 100):
        used.clear()
        result = bcu_fit(teacher, [x], epochs=4, lr=0.05, schedule_epochs=horizon, seed=0,
                         progress=False)
        span = 4 if horizon is None else horizon
        # An untrained teacher's student may trip the collapse guard: then a second training
        # follows the same schedule from its own lr.
        expected = [lr * (1 + math.cos(math.pi * e / span)) / 2
                    for lr in (0.05, result.retried_lr) if lr is not None for e in range(4)]
        assert used == pytest.approx(expected)


def test_bcu_runs_ignores_labels_is_reproducible_and_leaves_the_teacher_alone(digits):
    torch.manual_seed(0)
    teacher = digits_cnn().train()
    before = copy.deepcopy(teacher.state_dict())
    flags = [(m.training, getattr(m, "inplace", None)) for m in teacher.modules()]
    x, y = digits.clean[0][:48], digits.clean[1][:48]
    calls = []
    result = bcu_fit(teacher, [x[:24], x[24:]], eval_fn=lambda m, e: calls.append(e), **FAST)
    a = result.model
    b = bcu_cleanse(teacher, [(x[:24], y[:24]), (x[24:], y[24:])], **FAST)
    for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), name
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert flags == [(m.training, getattr(m, "inplace", None)) for m in teacher.modules()]
    # After every epoch of each training (two when the untrained teacher's guard retried).
    assert calls == [1, 2] * (1 if result.retried_lr is None else 2) and not a.training


def test_bcu_bad_input(digits):
    teacher = digits_cnn().eval()
    x = digits.clean[0][:16]
    with pytest.raises(ValueError, match="loader is empty"):
        bcu_cleanse(teacher, [], **FAST)
    with pytest.raises(TypeError, match="re-iterable"):
        bcu_cleanse(teacher, iter([x]), **FAST)
    with pytest.raises(ValueError, match="batch 0 of the loader must hold a non-empty float"):
        bcu_cleanse(teacher, [x[:0]], **FAST)
    for option, value in (("epochs", 0), ("temperature", 0.0), ("lr", -1.0), ("amp", "fp8"),
                          ("init", "xavier"), ("init", ["reset"]), ("schedule_epochs", 0),
                          ("schedule_epochs", 2.5)):
        with pytest.raises(ValueError, match=option):
            bcu_cleanse(teacher, [x], **{**FAST, option: value})
    with pytest.raises(FloatingPointError, match="non-finite at epoch 1, step 2"):
        bcu_cleanse(teacher, [x, x, x], lr=1e30, **FAST)


def test_ratio_scale_multiplies_every_ratio_up_to_one(monkeypatch, digits):
    import bdfast.defenses.bcu as bcu
    used = []
    real = bcu.partial_reinit

    def spy(model, ratios, init="reset"):
        used.append(dict(ratios))
        return real(model, ratios, init=init)

    monkeypatch.setattr(bcu, "partial_reinit", spy)
    torch.manual_seed(0)
    teacher = digits_cnn().eval()
    loader = [digits.clean[0][:16]]
    paper = bcu_ratios(teacher, loader[0])
    bcu_cleanse(teacher, loader, epochs=1, progress=False, seed=0, ratio_scale=2.0)
    bcu_cleanse(teacher, loader, epochs=1, progress=False, seed=0, ratios="uniform:0.6",
                ratio_scale=2.0)
    assert used[0] == {name: 2 * p for name, p in paper.items()}
    assert set(used[1].values()) == {1.0}
    with pytest.raises(ValueError, match="ratio_scale"):
        bcu_cleanse(teacher, loader, epochs=1, progress=False, ratio_scale=-1.0)
