"""Image classifiers for the lab and for real use.

- :func:`digits_cnn`: a small BatchNorm CNN for the 16x16 digits (fast on a CPU).
- :func:`vgg_small`: a plain VGG-style conv+BN net that applies ``F.relu(..., inplace=True)`` in
  its ``forward`` instead of ReLU modules, so the defenses are exercised on functional, in-place
  activations that hooks cannot see.
- :func:`resnet18_cifar`, :func:`preact_resnet18`, :func:`wrn16_1`: the 32x32 architectures of the
  papers. ``preact_resnet18`` follows He et al. 2016 (a final BN + ReLU before pooling);
  :func:`preact_resnet18_backdoorbench` is the same net in BackdoorBench's layout (no final BN),
  whose state_dict keys match that benchmark's PreActResNet18, so its checkpoints load directly.
- :func:`gn_resnet`, :func:`convnext_lab`, :func:`plain_cnn`: small lab nets *without* BatchNorm
  (GroupNorm, channels-first LayerNorm, no normalisation at all), on which DDE and MBNS refuse
  to run and MEDIC and BCU must still work.
- :func:`vit_lab`, :func:`convnext_cl_lab`: the layouts of today's downloaded nets in lab size: a
  ViT (patch embedding, bare class token and position embedding, ``nn.MultiheadAttention``,
  LayerNorm on tokens ``[B, L, C]``) and a channels-last ConvNeXt (LayerNorm and ``nn.Linear``
  pointwise layers on ``[B, H, W, C]``, a bare layer scale), as torchvision and timm build them.

Every model maps ``x [B, C, H, W]`` to logits ``[B, num_classes]``.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdfast._utils import check_number

__all__ = ["DigitsCNN", "VGGSmall", "ResNet18CIFAR", "PreActResNet18", "WideResNet",
           "GNResNet", "ConvNeXtLab", "LayerNorm2d", "PlainCNN", "ViTLab", "ConvNeXtCLLab",
           "digits_cnn", "vgg_small", "resnet18_cifar", "preact_resnet18",
           "preact_resnet18_backdoorbench", "wrn16_1", "gn_resnet", "convnext_lab", "plain_cnn",
           "vit_lab", "convnext_cl_lab"]


def _check(num_classes: int, in_channels: int) -> None:
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        check_number(value, name, integer=True)


def _conv_bn_relu(c_in: int, c_out: int) -> List[nn.Module]:
    # A conv feeding a BatchNorm needs no bias: the BN shift replaces it.
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    """Four 3x3 conv+BN+ReLU layers (32, 32, 64, 64 channels) with two 2x2 max-pools, then a
    linear classifier on the 4x4 map. Works for any input of at least 4x4."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        _check(num_classes, in_channels)
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 32), *_conv_bn_relu(32, 32), nn.MaxPool2d(2),
            *_conv_bn_relu(32, 64), *_conv_bn_relu(64, 64), nn.MaxPool2d(2),
            # A no-op at 16x16 input; keeps the classifier's size fixed for larger images.
            nn.AdaptiveAvgPool2d(4),
        )
        # Flattening the 4x4 map (rather than global pooling) keeps where a feature fired, which
        # lets a corner patch trigger be learned in a few epochs.
        self.classifier = nn.Linear(64 * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, H, W]`` -> logits ``[B, num_classes]``."""
        return self.classifier(self.features(x).flatten(1))


def digits_cnn(num_classes: int = 10, in_channels: int = 1) -> DigitsCNN:
    """The lab's small BN CNN for 16x16 images (every BN layer has at least 32 channels)."""
    return DigitsCNN(num_classes, in_channels)


class VGGSmall(nn.Module):
    """VGG-style: conv+BN blocks of 32, 32 | 64, 64 | 128 channels with max-pools between stages,
    global average pooling and a linear classifier. ReLUs are functional and in place."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        _check(num_classes, in_channels)
        widths = [32, 32, 64, 64, 128]
        self.pool_after = {1, 3}
        convs, bns, c_in = [], [], in_channels
        for c_out in widths:
            convs.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))
            bns.append(nn.BatchNorm2d(c_out))
            c_in = c_out
        self.convs = nn.ModuleList(convs)
        self.bns = nn.ModuleList(bns)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, H, W]`` -> logits ``[B, num_classes]``."""
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = F.relu(bn(conv(x)), inplace=True)
            if i in self.pool_after:
                x = F.max_pool2d(x, 2)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def vgg_small(num_classes: int = 10, in_channels: int = 1) -> VGGSmall:
    """A small VGG-style conv+BN net whose ReLUs are ``F.relu(x, inplace=True)`` calls."""
    return VGGSmall(num_classes, in_channels)


class _BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18CIFAR(nn.Module):
    """ResNet-18 for 32x32 images: 3x3 stem without max-pool, four stages of two BasicBlocks
    (64, 128, 256, 512 channels; strides 1, 2, 2, 2), global average pooling, ``fc``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        _check(num_classes, in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        stages, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(_BasicBlock(c_in, c_out, stride),
                                        _BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, H, W]`` -> logits ``[B, num_classes]``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNet18CIFAR:
    """The CIFAR ResNet-18 (BCU's architecture)."""
    return ResNet18CIFAR(num_classes, in_channels)


class _PreActBlock(nn.Module):
    """Pre-activation block: conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut; a projecting
    shortcut (``shortcut.0``, a 1x1 conv) takes the pre-activated input, an identity one takes x."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        # An empty Sequential adds no state_dict keys, matching checkpoints whose identity blocks
        # have no shortcut attribute at all.
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if len(self.shortcut) else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    """PreAct-ResNet-18: ``conv1``, ``layer1..4`` of two pre-activation blocks (``width`` x 1, 2,
    4, 8 channels: 64, 128, 256, 512 at the default width), then ``avgpool`` and ``linear``.

    Two layouts of the head:

    - ``final_bn=True``: He et al. 2016, *Identity Mappings in Deep Residual Networks*: the last
      block's output goes through a final BN (``bn``) and ReLU before the pooling.
    - ``final_bn=False``: BackdoorBench's layout (``models/preact_resnet.py`` of
      github.com/SCLBD/BackdoorBench): the last block's output is pooled as it is, and there is
      no ``bn`` (102 state_dict keys at 10 classes).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64,
                 final_bn: bool = True):
        super().__init__()
        _check(num_classes, in_channels)
        check_number(width, "width", integer=True)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        stages, c_in = [], width
        for c_out, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
            stages.append(nn.Sequential(_PreActBlock(c_in, c_out, stride),
                                        _PreActBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn: Optional[nn.BatchNorm2d] = nn.BatchNorm2d(c_in) if final_bn else None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, H, W]`` -> logits ``[B, num_classes]``."""
        x = self.conv1(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.bn is not None:
            x = F.relu(self.bn(x))
        return self.linear(self.avgpool(x).flatten(1))


def preact_resnet18(num_classes: int = 10, in_channels: int = 3,
                    width: int = 64) -> PreActResNet18:
    """PreAct-ResNet-18 as in He et al. 2016, with a final BN + ReLU before the pooling: its
    keys are BackdoorBench's plus ``bn.*`` (:func:`preact_resnet18_backdoorbench` has theirs).
    ``width`` is the first stage's channel count (64 in the paper; narrower nets train in minutes
    on a CPU and still give the pruning defenses hundreds of BN channels)."""
    return PreActResNet18(num_classes, in_channels, width)


def preact_resnet18_backdoorbench(num_classes: int = 10, in_channels: int = 3,
                                  width: int = 64) -> PreActResNet18:
    """PreAct-ResNet-18 in BackdoorBench's layout (``models/preact_resnet.py``): no final BN, and
    the same state_dict keys in the same order, so the ``model`` of one of its
    ``attack_result.pt`` files loads with ``strict=True`` at the default ``width``."""
    return PreActResNet18(num_classes, in_channels, width, final_bn=False)


class _WideBlock(nn.Module):
    """WRN block (pre-activation, two 3x3 convs). When the shape changes, the 1x1 ``shortcut``
    conv and ``conv1`` both read the pre-activated input; otherwise the skip is x itself."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut: Optional[nn.Conv2d] = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(act)
        out = F.relu(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + skip


class WideResNet(nn.Module):
    """Wide ResNet (Zagoruyko & Komodakis) for 32x32 images: 3x3 stem of 16 channels, three
    groups of (depth - 4) / 6 blocks with 16k, 32k, 64k channels (strides 1, 2, 2), final BN +
    ReLU, global average pooling and ``fc``."""

    def __init__(self, depth: int = 16, widen: int = 1, num_classes: int = 10,
                 in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        _check(num_classes, in_channels)
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        groups, c_in = [], 16
        for c_out, stride in ((16 * widen, 1), (32 * widen, 2), (64 * widen, 2)):
            blocks = [_WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, dropout)
                      for i in range(n)]
            groups.append(nn.Sequential(*blocks))
            c_in = c_out
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(c_in)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, H, W]`` -> logits ``[B, num_classes]``."""
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(self.avgpool(x).flatten(1))


def wrn16_1(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-16-1 (MEDIC's architecture): channels 16, 16, 32, 64; two blocks per group."""
    return WideResNet(16, 1, num_classes, in_channels)


class _SeparableBlock(nn.Module):
    """Residual block of a depthwise 3x3 conv (carrying the stride) and a pointwise 1x1 conv:
    gelu(gn2(pointwise(gelu(gn1(depthwise(x))))) + shortcut(x)), the shortcut a 1x1 conv +
    GroupNorm where the shape changes, else the identity."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__()
        # Every conv feeds a GroupNorm, whose shift replaces the conv's bias.
        self.depthwise = nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in,
                                   bias=False)
        self.gn1 = nn.GroupNorm(groups, c_in)
        self.act1 = nn.GELU()
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.gn2 = nn.GroupNorm(groups, c_out)
        self.act2 = nn.GELU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.GroupNorm(groups, c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.gn1(self.depthwise(x)))
        out = self.gn2(self.pointwise(out))
        return self.act2(out + self.shortcut(x))


class GNResNet(nn.Module):
    """GroupNorm residual net (8 groups everywhere, GELU modules): 3x3 stem conv + GN + GELU of
    32 channels, three stages of two depthwise-separable residual blocks (32, 64, 96 channels;
    strides 2, 2, 1), global average pooling and ``fc``. A 16x16 image ends as a 4x4 map."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        _check(num_classes, in_channels)
        groups = 8
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
                                  nn.GroupNorm(groups, 32), nn.GELU())
        stages, c_in = [], 32
        # Downsampling in the first two stages rather than the last two halves the cost of an
        # epoch (most of it was the 16x16 stage) and still ends on a 4x4 map.
        for c_out, stride in ((32, 2), (64, 2), (96, 1)):
            stages.append(nn.Sequential(_SeparableBlock(c_in, c_out, stride, groups),
                                        _SeparableBlock(c_out, c_out, 1, groups)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, H, W]`` -> logits ``[B, num_classes]``."""
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.avgpool(x).flatten(1))


def gn_resnet(num_classes: int = 10, in_channels: int = 1) -> GNResNet:
    """A small GroupNorm + GELU residual net with depthwise-separable blocks (no BatchNorm)."""
    return GNResNet(num_classes, in_channels)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of ``x [B, C, H, W]`` at every position, as ConvNeXt's
    channels-first LayerNorm. Input and output stay channels-first, so a forward hook sees
    [B, C, H, W] like any conv's output; the parameters are nn.LayerNorm's ``[C]`` ones."""

    def __init__(self, channels: int):
        super().__init__(channels)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W]`` -> ``[B, C, H, W]``."""
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ConvNeXtBlock(nn.Module):
    """ConvNeXt block: x + pw2(gelu(pw1(norm(depthwise 7x7(x))))), the pointwise layers 1x1
    convs (C -> 4C -> C), which equal ConvNeXt's channels-last Linear layers."""

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = LayerNorm2d(channels)
        self.pw1 = nn.Conv2d(channels, 4 * channels, 1)
        self.act = nn.GELU()
        self.pw2 = nn.Conv2d(4 * channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pw2(self.act(self.pw1(self.norm(self.depthwise(x)))))


class ConvNeXtLab(nn.Module):
    """ConvNeXt-style LayerNorm net: a 2x2 stride-2 patchify stem + LayerNorm2d, three stages of
    ConvNeXt blocks (16, 32, 64 channels; 2, 2, 1 blocks) with a LayerNorm2d + 2x2 stride-2 conv
    downsampling before the second and third, global average pooling, a final LayerNorm and
    ``fc``. A 16x16 image ends as a 2x2 map. ``block(channels)`` makes each ConvNeXt block
    (:class:`ConvNeXtCLLab` passes its channels-last one)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 block: Callable[[int], nn.Module] = _ConvNeXtBlock):
        super().__init__()
        _check(num_classes, in_channels)
        widths, depths = (16, 32, 64), (2, 2, 1)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 2, stride=2),
                                  LayerNorm2d(widths[0]))
        stages, c_in = [], widths[0]
        for c_out, depth in zip(widths, depths):
            downsample = [] if c_out == c_in else [LayerNorm2d(c_in),
                                                   nn.Conv2d(c_in, c_out, 2, stride=2)]
            stages.append(nn.Sequential(*downsample, *(block(c_out) for _ in range(depth))))
            c_in = c_out
        self.stage1, self.stage2, self.stage3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.LayerNorm(c_in)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, H, W]`` -> logits ``[B, num_classes]``."""
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.norm(self.avgpool(x).flatten(1)))


def convnext_lab(num_classes: int = 10, in_channels: int = 1) -> ConvNeXtLab:
    """A small ConvNeXt-style net with channels-first LayerNorms (no BatchNorm)."""
    return ConvNeXtLab(num_classes, in_channels)


class PlainCNN(nn.Module):
    """No normalisation at all: 3x3 conv (with bias) + ReLU modules of 32, 32 | 48, 48 | 64
    channels with a 2x2 max-pool after each stage, global average pooling and ``fc``. A 16x16
    image ends as a 2x2 map."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        _check(num_classes, in_channels)
        layers: List[nn.Module] = []
        c_in = in_channels
        for stage in ((32, 32), (48, 48), (64,)):
            for c_out in stage:
                conv = nn.Conv2d(c_in, c_out, 3, padding=1)
                # With no normalisation to rescale them, PyTorch's default conv init shrinks the
                # activations about 6-fold in variance per conv + ReLU, and SGD at the lab's lr
                # barely moves the tiny logits; He init keeps the variance through the ReLUs.
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)
                layers += [conv, nn.ReLU(inplace=True)]
                c_in = c_out
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, H, W]`` -> logits ``[B, num_classes]``."""
        return self.fc(self.avgpool(self.features(x)).flatten(1))


def plain_cnn(num_classes: int = 10, in_channels: int = 1) -> PlainCNN:
    """A small conv + ReLU net without any normalisation layer."""
    return PlainCNN(num_classes, in_channels)


class _EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block on tokens ``[B, L, C]``:
    x + attention(ln1(x)), then + mlp(ln2(x)) with a C -> 4C -> C GELU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, L, C]`` -> ``[B, L, C]``."""
        y = self.ln1(x)
        x = x + self.attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ViTLab(nn.Module):
    """A small vision transformer: a 4x4 stride-4 patch-embedding conv (a 16x16 image is 16
    tokens of 64 features), a bare ``class_token`` [1, 1, 64] and ``pos_embedding`` [1, 17, 64]
    (torchvision's names and initialisations: zeros, normal std 0.02), three pre-LayerNorm
    encoder blocks of 4-head ``nn.MultiheadAttention`` and a GELU MLP, a final LayerNorm and
    ``head``, a Linear on the class token. ``image_size`` must be a multiple of 4."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 16):
        super().__init__()
        _check(num_classes, in_channels)
        patch, dim, depth, heads = 4, 64, 3, 4
        if image_size % patch != 0:
            raise ValueError(f"image_size must be a multiple of {patch}, got {image_size}")
        tokens = (image_size // patch) ** 2 + 1
        self.patch_embedding = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.empty(1, tokens, dim).normal_(std=0.02))
        self.blocks = nn.Sequential(*(_EncoderBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, image_size, image_size]`` -> logits ``[B, num_classes]``."""
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)  # [B, L - 1, C]
        tokens = torch.cat([self.class_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = self.blocks(tokens + self.pos_embedding)
        return self.head(self.norm(tokens)[:, 0])


def vit_lab(num_classes: int = 10, in_channels: int = 1, image_size: int = 16) -> ViTLab:
    """A small ViT for ``image_size`` square images, a multiple of 4 (patch 4, 3 blocks of
    width 64, ``nn.MultiheadAttention``)."""
    return ViTLab(num_classes, in_channels, image_size)


class _ConvNeXtCLBlock(nn.Module):
    """ConvNeXt block as torchvision and timm write it: a depthwise 7x7 conv on ``[B, C, H, W]``,
    then, permuted to ``[B, H, W, C]``, LayerNorm over the last dim, Linear C -> 4C, GELU, Linear
    4C -> C and the layer scale ``gamma`` [C], permuted back and added to the input."""

    def __init__(self, channels: int, init_values: float):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.pw1 = nn.Linear(channels, 4 * channels)
        self.act = nn.GELU()
        self.pw2 = nn.Linear(4 * channels, channels)
        # Kept, as timm's blocks keep it, so a fresh copy starts from the same layer scale.
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((channels,), init_values))

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W]`` -> ``[B, C, H, W]``."""
        y = self.depthwise(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pw2(self.act(self.pw1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtCLLab(ConvNeXtLab):
    """Channels-last ConvNeXt-style net: :class:`ConvNeXtLab`'s layout with the blocks of
    :class:`_ConvNeXtCLBlock`. A 16x16 image ends as a 2x2 map.

    The layer scales start at 1.0, not ConvNeXt's 1e-6, so a block starts as
    :class:`ConvNeXtLab`'s. A first two-stage variant (32 and 64 channels, 5x5 depthwise convs)
    did not make a usable lab net: with layer scales at 1e-6 or 0.1 the lab's SGD left it at a
    clean accuracy of 0.14 on the digits (badnets, seed 0), AdamW (lr 2e-3, weight decay 0.05)
    implanted badnets only to an ASR of 0.59 and 0.72, and at 1.0 to 0.70."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__(num_classes, in_channels,
                         block=functools.partial(_ConvNeXtCLBlock, init_values=1.0))


def convnext_cl_lab(num_classes: int = 10, in_channels: int = 1) -> ConvNeXtCLLab:
    """A small ConvNeXt-style net with channels-last LayerNorms, Linear pointwise layers and
    layer scales (no BatchNorm)."""
    return ConvNeXtCLLab(num_classes, in_channels)
