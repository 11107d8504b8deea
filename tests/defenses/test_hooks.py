"""Layer selection, activation taps and the teacher statistics built on them."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdfast.hooks import (Tap, disable_inplace, find_inplace_overwrites, residual_blocks,
                          select_layers)
from bdfast.defenses.medic import Medic, auto_layers, teacher_statistics
from bdfast.lab.models import vgg_small


class Small(nn.Module):
    """conv -> BN -> ReLU -> linear, with the ReLU functional and in place when asked."""

    def __init__(self, functional_inplace: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * 6 * 6, 3)
        self.functional_inplace = functional_inplace

    def forward(self, x):
        x = self.bn(self.conv(x))
        x = F.relu(x, inplace=True) if self.functional_inplace else self.relu(x)
        return self.fc(x.flatten(1))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.conv(self.conv(x)).mean((2, 3))


def _model(functional_inplace=False, seed=0):
    torch.manual_seed(seed)
    model = Small(functional_inplace)
    with torch.no_grad():  # non-trivial BN statistics, so BN output differs from its input
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def test_select_layers_presets_and_order():
    model = _model()
    assert select_layers(model) == ["conv", "bn", "fc"]
    assert select_layers(model, "conv+bn") == ["conv", "bn"]
    assert select_layers(model, [nn.Linear, "conv"]) == ["conv", "fc"]
    with pytest.raises(ValueError, match="layers must be one of"):
        select_layers(model, "everything")


def test_tap_captures_conv_bn_linear_outputs():
    model = _model()
    x = torch.randn(5, 1, 6, 6)
    with torch.no_grad(), Tap(model, ["conv", "bn", "fc"], clone=["bn"]) as tap:
        logits = model(x)
    conv, bn, fc = tap.values()
    with torch.no_grad():
        assert torch.equal(conv, model.conv(x))
        assert torch.equal(bn, model.bn(model.conv(x)))
        assert torch.equal(fc, logits)


def test_disable_inplace_only_touches_the_copy():
    model = _model()
    copied = copy.deepcopy(model)
    assert disable_inplace(copied) == 1
    assert model.relu.inplace is True and copied.relu.inplace is False


def test_functional_inplace_relu_is_detected_and_handled():
    model = _model(functional_inplace=True)
    plain = _model(functional_inplace=False)
    disable_inplace(plain)  # same weights, ReLU out of place: the ground truth
    x = torch.randn(8, 1, 6, 6)
    names = select_layers(model)
    assert find_inplace_overwrites(model, names, x) == ["bn"]
    assert find_inplace_overwrites(plain, names, x) == []

    # Captured with clone=: the BN output keeps its negative values, the model's output is
    # unchanged, and the gradient w.r.t. the captured output is the one of the plain model.
    model.requires_grad_(False)
    plain.requires_grad_(False)
    grads = []
    for net, clone in ((model, ["bn"]), (plain, [])):
        with torch.enable_grad(), Tap(net, names, clone=clone, require_grad=True) as tap:
            logits = net(x)
        values = tap.values()
        assert not tap.modified_in_place()
        grads.append((logits, values, torch.autograd.grad(logits.square().sum(), values)))
    (logits_a, values_a, g_a), (logits_b, values_b, g_b) = grads
    assert (values_a[1] < 0).any()
    torch.testing.assert_close(logits_a, logits_b)
    for a, b in zip(values_a + list(g_a), values_b + list(g_b)):
        torch.testing.assert_close(a, b)


def test_module_run_twice_is_a_clear_error():
    model = Twice()
    with pytest.raises(RuntimeError, match="'conv' ran twice in one forward pass"), \
            Tap(model, ["conv"]):
        model(torch.randn(2, 2, 3, 3))


def test_teacher_statistics_match_a_direct_float64_computation():
    torch.manual_seed(0)
    model = vgg_small().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    x = torch.rand(70, 1, 16, 16)
    loader = [x[:32], x[32:33], x[33:]]  # uneven batches, one of a single image
    names = select_layers(model)
    overwritten = find_inplace_overwrites(model, names, x[:4])
    assert overwritten == [f"bns.{i}" for i in range(5)]  # vgg_small's F.relu(..., inplace=True)
    mu, sigma = teacher_statistics(model, names, loader, device=torch.device("cpu"),
                                   clone=overwritten)

    with torch.no_grad(), Tap(model, names, clone=overwritten) as tap:
        model(x)
    for name, value, m, s in zip(names, tap.values(), mu, sigma):
        flat = value.double().transpose(0, 1).reshape(value.shape[1], -1)
        torch.testing.assert_close(m, flat.mean(1).float(), rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(s, flat.std(1).float(), rtol=1e-5, atol=1e-6, msg=name)
    bn_mu = mu[names.index("bns.0")]
    assert bn_mu.min() < 0  # statistics of the BN output before the in-place ReLU


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(2, channels)
        self.act = nn.GELU()

    def forward(self, x):
        return x + self.act(self.norm(self.conv(x)))


class GroupNormNet(nn.Module):
    """A stem container of leaves, then a stage of two residual blocks: the blocks are the two
    non-container modules with children that sit in a container."""

    def __init__(self, functional_activations: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4))
        self.stage = nn.Sequential(Residual(4), Residual(4))
        if functional_activations:
            for block in self.stage:
                block.act = nn.Identity()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.stage(self.stem(x)).mean((2, 3)))


def test_activation_and_block_presets():
    model = GroupNormNet()
    assert select_layers(model, "act+linear") == ["stage.0.act", "stage.1.act", "fc"]
    assert select_layers(model, "block+linear") == ["stage.0", "stage.1", "fc"]
    assert residual_blocks(model) == ["stage.0", "stage.1"]
    # A net of leaves in containers has no blocks: the preset still finds the classifier.
    assert select_layers(Small(), "block+linear") == ["fc"]


def test_medic_auto_layers_picks_by_architecture():
    assert auto_layers(Small()) == "conv+norm+linear"  # BatchNorm
    assert auto_layers(GroupNormNet()) == "act+linear"
    # No activation module to hook: the paper's layers.
    assert auto_layers(GroupNormNet(functional_activations=True)) == "conv+norm+linear"
    # No normalisation at all: the paper's layers.
    unnormalised = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    assert auto_layers(unnormalised) == "conv+norm+linear"


def test_medic_auto_layers_takes_the_paper_layers_on_transformers():
    from bdfast.lab import models

    # The lab's ViT and channels-last ConvNeXt: LayerNorm and GELU, no BatchNorm.
    assert auto_layers(models.vit_lab()) == "conv+norm+linear"
    assert auto_layers(models.convnext_cl_lab()) == "act+linear"
    # A transformer is known by its attention module or by a bare token or position parameter.
    blocks = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())
    assert auto_layers(blocks) == "act+linear"
    assert auto_layers(nn.Sequential(blocks, nn.MultiheadAttention(8, 2))) == "conv+norm+linear"
    for name in ("cls_token", "pos_embed", "relative_position_bias_table"):
        with_parameter = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())
        with_parameter.register_parameter(name, nn.Parameter(torch.zeros(1, 1, 8)))
        assert auto_layers(with_parameter) == "conv+norm+linear", name


def test_medic_records_the_layers_auto_chose():
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    options = dict(epochs=1, progress=False, seed=0, amp=False)
    result = Medic(**options).fit(GroupNormNet(), [(x, y)])
    assert result.layer_preset == "act+linear"
    assert result.layers == ["stage.0.act", "stage.1.act", "fc"]
    result = Medic(**options).fit(Small(), [(x, y)])
    assert result.layer_preset == "conv+norm+linear" and result.layers == ["conv", "bn", "fc"]
    assert Medic(**options, layers=[nn.Linear]).fit(Small(), [(x, y)]).layer_preset is None
