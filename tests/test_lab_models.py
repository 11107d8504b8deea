"""bdfast.models: shapes, the architectures' defining properties and BackdoorBench key names."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bdfast import models


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("factory, shape", [
    (models.digits_cnn, (3, 1, 16, 16)),
    (models.vgg_small, (3, 1, 16, 16)),
    (models.resnet18_cifar, (2, 3, 32, 32)),
    (models.preact_resnet18, (2, 3, 32, 32)),
    (models.wrn16_1, (2, 3, 32, 32)),
])
def test_logits_shape_and_backward(factory, shape):
    torch.manual_seed(0)
    model = factory(num_classes=7, in_channels=shape[1])
    x = torch.rand(*shape)
    out = model(x)
    assert out.shape == (shape[0], 7) and out.dtype == torch.float32
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_digits_cnn_is_small_with_wide_bn_and_relu_modules():
    model = models.digits_cnn()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(bn.num_features >= 32 for bn in bns)
    assert _count(model, nn.ReLU) == len(bns)
    assert sum(p.numel() for p in model.parameters()) < 200_000
    # It also accepts larger images (the adaptive pooling keeps the classifier's input fixed).
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10)


def test_vgg_small_uses_functional_inplace_relu():
    model = models.vgg_small().eval()
    assert _count(model, nn.ReLU) == 0 and _count(model, nn.BatchNorm2d) >= 3
    seen = []
    # The conv+BN output is overwritten by the in-place ReLU: no negative value survives in the
    # tensor the BN hook captured.
    model.bns[0].register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(torch.rand(4, 1, 16, 16))
    assert float(seen[0].min()) >= 0.0


def test_same_seed_same_initialisation():
    torch.manual_seed(5)
    a = models.digits_cnn()
    torch.manual_seed(5)
    b = models.digits_cnn()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_resnet18_cifar_architecture():
    model = models.resnet18_cifar()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert _count(model, nn.MaxPool2d) == 0
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    # 1x1 conv + BN shortcuts exactly where the shape changes.
    shortcuts = [name for name, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert shortcuts == ["layer2.0.shortcut.0", "layer3.0.shortcut.0", "layer4.0.shortcut.0"]
    assert isinstance(model.layer2[0].shortcut[1], nn.BatchNorm2d)
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == 512
    # The well-known size of the 10-class CIFAR ResNet-18.
    assert sum(p.numel() for p in model.parameters()) == 11_173_962


def _expected_preact_keys() -> set:
    """State_dict keys of BackdoorBench's PreActResNet18, written out from its layout."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "linear.weight", "linear.bias"} | {f"bn.{k}" for k in bn}
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            keys |= {f"{p}.bn1.{k}" for k in bn} | {f"{p}.bn2.{k}" for k in bn}
            keys |= {f"{p}.conv1.weight", f"{p}.conv2.weight"}
            if layer > 1 and block == 0:
                keys.add(f"{p}.shortcut.0.weight")
    return keys


def test_preact_resnet18_matches_backdoorbench_keys():
    model = models.preact_resnet18()
    state = model.state_dict()
    assert set(state) == _expected_preact_keys()
    assert state["layer2.0.shortcut.0.weight"].shape == (128, 64, 1, 1)
    assert state["bn.weight"].shape == (512,) and state["linear.weight"].shape == (10, 512)
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    # A checkpoint with exactly these keys loads strictly.
    model.load_state_dict(models.preact_resnet18().state_dict(), strict=True)


def test_wrn16_1_architecture():
    model = models.wrn16_1()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # The stem plus 3 groups x 2 blocks x 2 convs; 1x1 projections where the width changes.
    assert sum(c.kernel_size == (3, 3) for c in convs) == 13
    assert sum(c.kernel_size == (1, 1) for c in convs) == 2
    widths = sorted({c.out_channels for c in convs})
    assert widths == [16, 32, 64]
    # Parameters counted by hand from the WRN-16-1 layout: stem 432; group 1: 2 x 4,672;
    # group 2: 14,432 + 18,560; group 3: 57,536 + 73,984; final BN 128; fc 650.
    assert sum(p.numel() for p in model.parameters()) == 175_066


@pytest.mark.parametrize("factory", [models.digits_cnn, models.vgg_small, models.resnet18_cifar,
                                     models.preact_resnet18, models.wrn16_1])
def test_bad_arguments_are_rejected(factory):
    with pytest.raises(ValueError, match="num_classes"):
        factory(num_classes=0)
    with pytest.raises(ValueError, match="in_channels"):
        factory(in_channels=0)


@pytest.mark.parametrize("width", [16, 64])
def test_preact_resnet18_width_scales_every_stage(width):
    model = models.preact_resnet18(num_classes=10, in_channels=1, width=width)
    bn_channels = [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    # Per stage: the first block's bn1 sees the previous stage's width, then 3 BNs of its own.
    expected = []
    c_in = width
    for c_out in (width, 2 * width, 4 * width, 8 * width):
        expected += [c_in, c_out, c_out, c_out]
        c_in = c_out
    assert bn_channels == expected + [8 * width]
    assert model.linear.in_features == 8 * width
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="width"):
        models.preact_resnet18(width=0)
