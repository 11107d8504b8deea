"""bdfast.lab.models: shapes, the architectures' defining properties and BackdoorBench's key names;
the nets without BatchNorm also go through MEDIC and BCU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import bdfast
from bdfast.lab import models
from bdfast.lab.data import load_digits
from bdfast.loaders import tensor_loader
from bdfast.hooks import BATCHNORM, NORM

NO_BATCHNORM = [models.gn_resnet, models.convnext_lab, models.plain_cnn]
# The nets in the layouts of torchvision's and timm's transformers and ConvNeXts.
TOKEN_NETS = [models.vit_lab, models.convnext_cl_lab]


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("factory, shape", [
    (models.digits_cnn, (3, 1, 16, 16)),
    (models.vgg_small, (3, 1, 16, 16)),
    (models.resnet18_cifar, (2, 3, 32, 32)),
    (models.preact_resnet18, (2, 3, 32, 32)),
    (models.preact_resnet18_backdoorbench, (2, 3, 32, 32)),
    (models.wrn16_1, (2, 3, 32, 32)),
    (models.gn_resnet, (3, 1, 16, 16)),
    (models.convnext_lab, (3, 1, 16, 16)),
    (models.plain_cnn, (3, 1, 16, 16)),
    (models.vit_lab, (3, 1, 16, 16)),
    (models.convnext_cl_lab, (3, 3, 16, 16)),
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


# The modules with parameters or buffers of BackdoorBench's PreActResNet18, in registration
# order, read from models/preact_resnet.py of github.com/SCLBD/BackdoorBench at commit
# f02e3534645f0ee63d6848653062cd6c0d6c400d (PreActBlock: bn1, conv1, bn2, conv2 and, where the
# shape changes, shortcut.0, a 1x1 conv without BN; no BN after layer4).
BACKDOORBENCH_PREACT_MODULES = [
    "conv1",
    "layer1.0.bn1", "layer1.0.conv1", "layer1.0.bn2", "layer1.0.conv2",
    "layer1.1.bn1", "layer1.1.conv1", "layer1.1.bn2", "layer1.1.conv2",
    "layer2.0.bn1", "layer2.0.conv1", "layer2.0.bn2", "layer2.0.conv2", "layer2.0.shortcut.0",
    "layer2.1.bn1", "layer2.1.conv1", "layer2.1.bn2", "layer2.1.conv2",
    "layer3.0.bn1", "layer3.0.conv1", "layer3.0.bn2", "layer3.0.conv2", "layer3.0.shortcut.0",
    "layer3.1.bn1", "layer3.1.conv1", "layer3.1.bn2", "layer3.1.conv2",
    "layer4.0.bn1", "layer4.0.conv1", "layer4.0.bn2", "layer4.0.conv2", "layer4.0.shortcut.0",
    "layer4.1.bn1", "layer4.1.conv1", "layer4.1.bn2", "layer4.1.conv2",
    "linear",
]
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _keys_of(modules) -> list:
    """The state_dict keys, in order, of modules named as above (BN, conv or linear by name)."""
    keys = []
    for name in modules:
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("bn"):
            keys += [f"{name}.{k}" for k in BN_KEYS]
        elif name == "linear":
            keys += [f"{name}.weight", f"{name}.bias"]
        else:  # every conv of the net is bias-free
            keys.append(f"{name}.weight")
    return keys


def test_preact_resnet18_backdoorbench_has_their_keys_in_their_order():
    model = models.preact_resnet18_backdoorbench()
    state = model.state_dict()
    # Their loader renames a checkpoint's keys by position, so the order matters too.
    assert list(state) == _keys_of(BACKDOORBENCH_PREACT_MODULES)
    assert len(state) == 102
    assert state["layer2.0.shortcut.0.weight"].shape == (128, 64, 1, 1)
    assert state["linear.weight"].shape == (10, 512)
    assert model.bn is None and isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    model.load_state_dict(models.preact_resnet18_backdoorbench().state_dict(), strict=True)


def test_preact_resnet18_is_he_et_al_with_a_final_bn():
    model = models.preact_resnet18()
    state = model.state_dict()
    # BackdoorBench's keys before the head, then the final BN's, then the classifier's.
    theirs = _keys_of(BACKDOORBENCH_PREACT_MODULES)
    assert list(state) == theirs[:-2] + [f"bn.{k}" for k in BN_KEYS] + theirs[-2:]
    assert state["bn.weight"].shape == (512,)
    # The final BN + ReLU is the only difference: with it set to the identity (weight 1, bias 0,
    # running mean 0 and variance 1 - eps) on non-negative features, the two layouts agree.
    twin = models.preact_resnet18_backdoorbench()
    twin.load_state_dict({k: v for k, v in state.items() if not k.startswith("bn.")})
    model.eval(), twin.eval()
    with torch.no_grad():
        model.bn.running_var.fill_(1 - model.bn.eps)
        x = torch.rand(2, 3, 32, 32)
        features = twin.layer4(twin.layer3(twin.layer2(twin.layer1(twin.conv1(x)))))
        relu_free = twin.linear(twin.avgpool(features.relu()).flatten(1))
        torch.testing.assert_close(model(x), relu_free)


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
                                     models.preact_resnet18, models.preact_resnet18_backdoorbench,
                                     models.wrn16_1, *NO_BATCHNORM, *TOKEN_NETS])
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


# --- the nets without BatchNorm ------------------------------------------------------------

@pytest.mark.parametrize("factory", NO_BATCHNORM)
@pytest.mark.parametrize("size", [8, 16, 28])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_no_batchnorm_nets_take_any_size_from_8(factory, size, in_channels):
    model = factory(in_channels=in_channels).eval()
    with torch.no_grad():
        assert model(torch.rand(2, in_channels, size, size)).shape == (2, 10)


@pytest.mark.parametrize("factory, norms, activation", [
    (models.gn_resnet, {nn.GroupNorm}, nn.GELU),
    (models.convnext_lab, {models.LayerNorm2d, nn.LayerNorm}, nn.GELU),
    (models.plain_cnn, set(), nn.ReLU),
])
def test_no_batchnorm_nets_normalise_as_named(factory, norms, activation):
    model = factory()
    assert _count(model, BATCHNORM) == 0
    assert {type(m) for m in model.modules() if isinstance(m, NORM)} == norms
    if not norms:  # no normalisation of any kind, also none outside torch's norm classes
        assert not any("Norm" in type(m).__name__ for m in model.modules())
    # Activation modules, not functional calls, so that forward hooks see them.
    assert _count(model, activation) > 0
    # Small enough to train in well under a second per epoch on two CPU cores.
    assert 20_000 <= sum(p.numel() for p in model.parameters()) <= 80_000


def test_gn_resnet_layout():
    model = models.gn_resnet()
    assert all(gn.num_groups == 8 for gn in model.modules() if isinstance(gn, nn.GroupNorm))
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    # One depthwise conv per block: 3 stages x 2 blocks, each followed by a pointwise conv.
    assert len(depthwise) == 6 and all(m.groups == m.in_channels for m in depthwise)
    assert [layer[0].pointwise.out_channels for layer in
            (model.layer1, model.layer2, model.layer3)] == [32, 64, 96]
    # A 1x1 conv + GroupNorm shortcut exactly where the shape changes: every stage's first block.
    assert [len(layer[0].shortcut) for layer in (model.layer1, model.layer2, model.layer3)] == \
        [2, 2, 2]
    assert all(len(layer[1].shortcut) == 0 for layer in (model.layer1, model.layer2, model.layer3))
    assert [layer[0].depthwise.stride for layer in (model.layer1, model.layer2, model.layer3)] == \
        [(2, 2), (2, 2), (1, 1)]


def test_layer_norm_2d_normalises_each_position_over_channels_only():
    norm = models.LayerNorm2d(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 6, 5, 4) * 3 + 1
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight[:, None, None] \
        + norm.bias[:, None, None]
    torch.testing.assert_close(norm(x), expected)
    # GroupNorm(1, C) would normalise over channels *and* positions: a different result.
    assert not torch.allclose(norm(x), nn.GroupNorm(1, 6)(x), atol=1e-3)


def _outputs(model: nn.Module, x: torch.Tensor):
    """{module name: output shape} of every module of ``model`` that runs on ``x``."""
    shapes = {}
    handles = [m.register_forward_hook(
        lambda mod, args, out, name=name: shapes.__setitem__(
            name, tuple((out[0] if isinstance(out, tuple) else out).shape)))
        for name, m in model.named_modules() if name]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return shapes


def test_vit_lab_layout():
    model = models.vit_lab().eval()
    assert _count(model, BATCHNORM) == 0 and _count(model, nn.MultiheadAttention) == 3
    # Bare parameters as torchvision's VisionTransformer holds them: no module resets them.
    own = dict(model.named_parameters(recurse=False))
    assert set(own) == {"class_token", "pos_embedding"}
    assert own["class_token"].shape == (1, 1, 64) and not own["class_token"].any()
    assert own["pos_embedding"].shape == (1, 17, 64)
    assert 0.01 < float(own["pos_embedding"].detach().std()) < 0.03
    shapes = _outputs(model, torch.rand(2, 1, 16, 16))
    assert shapes["patch_embedding"] == (2, 64, 4, 4)
    # LayerNorms, attention and MLP outputs are tokens [B, L, C]: 16 patches + the class token.
    for name in ("blocks.0.ln1", "blocks.0.attention", "blocks.0.mlp.1", "blocks.2", "norm"):
        assert shapes[name][:2] == (2, 17)
    assert shapes["blocks.0.mlp.1"][2] == 256 and shapes["head"] == (2, 10)
    # The attention's out_proj is applied functionally, so its hook never fires.
    assert "blocks.0.attention.out_proj" not in shapes
    with pytest.raises(ValueError, match="multiple of 4"):
        models.ViTLab(image_size=18)


def test_convnext_cl_lab_layout():
    model = models.convnext_cl_lab().eval()
    assert _count(model, BATCHNORM) == 0
    gammas = [(n, p) for n, p in model.named_parameters() if n.endswith("gamma")]
    assert len(gammas) == 5 and all(torch.all(p == 1.0) for _, p in gammas)
    shapes = _outputs(model, torch.rand(2, 1, 16, 16))
    # Inside a block the norm and the pointwise Linears see channels-last maps [B, H, W, C].
    assert shapes["stage1.0.norm"] == (2, 8, 8, 16) and shapes["stage1.0.pw1"] == (2, 8, 8, 64)
    assert shapes["stage3.2.pw2"] == (2, 2, 2, 64)
    # The blocks themselves, the depthwise convs and the downsampling stay channels-first.
    assert shapes["stage1.0.depthwise"] == (2, 16, 8, 8) and shapes["stage2.3"] == (2, 32, 4, 4)
    assert shapes["fc"] == (2, 10)
    # At a layer scale of 1 the blocks compute ConvNeXtLab's, whose 1x1 convs these Linears are.
    torch.manual_seed(0)
    reference = models.convnext_lab().eval()
    state = {k: v.reshape(model.state_dict()[k].shape) for k, v in reference.state_dict().items()}
    model.load_state_dict(state, strict=False)
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("factory", TOKEN_NETS)
def test_token_nets_are_small(factory):
    # Small enough for the lab to train one in a few minutes on two CPU cores.
    assert 50_000 <= sum(p.numel() for p in factory().parameters()) <= 160_000


@pytest.fixture(scope="module")
def clean_loader():
    x, y = load_digits().clean
    return tensor_loader(x[:64], y[:64], batch_size=32, shuffle=True, seed=0)


@pytest.mark.parametrize("factory", NO_BATCHNORM + TOKEN_NETS)
@pytest.mark.parametrize("defense", [bdfast.medic_clone, bdfast.bcu_cleanse])
def test_medic_and_bcu_clean_nets_without_batchnorm(factory, defense, clean_loader):
    torch.manual_seed(0)
    teacher = factory().eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = defense(teacher, clean_loader, epochs=1, progress=False, seed=0)
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        logits = student(x)
    assert logits.shape == (5, 10) and bool(torch.isfinite(logits).all())
    assert student is not teacher and type(student) is type(teacher)
    after = student.state_dict()
    assert set(after) == set(before)
    assert any(not torch.equal(after[k], v) for k, v in before.items())
    # The teacher is untouched.
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
