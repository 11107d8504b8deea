"""bdfast.defenses.reinit: a fresh copy of any net (MEDIC's student, BCU's replacement values), and
BCU's depth groups on transformers and channels-last ConvNeXts."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from bdfast.defenses.bcu import bcu_ratios, partial_reinit
from bdfast.defenses.medic import _student
from bdfast.lab.models import digits_cnn, gn_resnet, resnet18_cifar
from bdfast.defenses.reinit import LAYER_SCALE_INIT, check_reinit, reinit_model

tvm = pytest.importorskip("torchvision.models")

GROUPS = (0.01, 0.03, 0.09, 0.27)


def _reset_each_module(model: nn.Module) -> None:
    """What MEDIC's student did before bdfast.defenses.reinit: every module with parameters of its
    own calls reset_parameters(), in named_modules() order; norms without them reset their stats."""
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.reset_parameters()
        elif hasattr(module, "reset_running_stats"):
            module.reset_running_stats()


def _small_vit(num_layers: int = 2) -> nn.Module:
    return tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=num_layers, num_heads=2,
                                 hidden_dim=32, mlp_dim=64, num_classes=10)


def _trained_looking(model: nn.Module) -> nn.Module:
    """A copy whose every parameter and running statistic is 0.5: nothing a fresh init draws."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        floats = [b for b in model.buffers() if b.is_floating_point()]
        for tensor in list(model.parameters()) + floats:
            tensor.fill_(0.5)
    return model


@pytest.mark.parametrize("factory", [resnet18_cifar, digits_cnn, gn_resnet, tvm.resnet18])
def test_nets_with_reset_parameters_get_the_same_draws_as_before(factory):
    teacher = _trained_looking(factory())
    torch.manual_seed(7)
    before = copy.deepcopy(teacher)
    _reset_each_module(before)
    torch.manual_seed(7)
    after = _student(teacher, [], fresh=True)
    for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(p, torch.full_like(p, 0.5)) for p in after.parameters())


def test_bare_parameters_get_their_librarys_initialisation():
    torch.manual_seed(0)
    vit = _student(_trained_looking(_small_vit()), [], fresh=True)
    assert torch.equal(vit.class_token, torch.zeros(1, 1, 32))
    pos = vit.encoder.pos_embedding
    assert pos.shape == (1, 17, 32) and 0.015 < float(pos.detach().std()) < 0.025
    attention = vit.encoder.layers[0].self_attention
    assert torch.equal(attention.in_proj_bias, torch.zeros(96))
    bound = (6 / (32 + 96)) ** 0.5  # Xavier-uniform of the [96, 32] input projection
    assert float(attention.in_proj_weight.detach().abs().max()) <= bound
    assert float(attention.in_proj_weight.detach().std()) > bound / 3
    # MultiheadAttention's constructor zeroes out_proj's bias after the Linear drew it.
    assert torch.equal(attention.out_proj.bias, torch.zeros(32))
    assert not torch.equal(attention.out_proj.weight, torch.full((32, 32), 0.5))

    convnext = _student(_trained_looking(tvm.convnext_tiny(num_classes=10)), [], fresh=True)
    scale = convnext.features[1][0].layer_scale
    assert scale.shape == (96, 1, 1)
    assert torch.equal(scale, torch.full_like(scale, LAYER_SCALE_INIT))

    swin = _student(_trained_looking(tvm.swin_t(num_classes=10)), [], fresh=True)
    table = swin.features[1][0].attn.relative_position_bias_table
    assert table.shape == (169, 3) and 0.015 < float(table.detach().std()) < 0.025
    assert float(table.abs().max()) <= 2.0  # truncated at +-2, as torch's trunc_normal_


def test_layer_scale_takes_the_init_value_its_module_records():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.init_values = 0.1
            self.gamma = nn.Parameter(torch.full((8,), 3.0))

    model = nn.Sequential(nn.Linear(4, 8), Scale())
    reinit_model(model)
    assert torch.equal(model[1].gamma, torch.full((8,), 0.1))


def test_a_parameter_without_a_rule_is_named_with_its_shape():
    class Norm(nn.Module):  # gamma beside beta: a normalisation's scale, not a layer scale
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(8))
            self.beta = nn.Parameter(torch.zeros(8))

    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Parameter(torch.ones(2, 3))

    for model, name, shape in ((nn.Sequential(nn.Linear(4, 8), Norm()), "1.gamma", [8]),
                               (nn.Sequential(nn.Sequential(nn.Linear(2, 2), Weird())),
                                "0.1.mix", [2, 3])):
        original = copy.deepcopy(model)
        with pytest.raises(TypeError,
                           match=re.escape(f"parameter '{name}' {shape} of") + ".* student="):
            check_reinit(model)
        with pytest.raises(TypeError, match=re.escape(f"parameter '{name}'")):
            _student(model, [], fresh=True)
        # Nothing was drawn before the check: the source and the RNG are as they were.
        for a, b in zip(model.parameters(), original.parameters()):
            assert torch.equal(a, b)


def test_bcu_replaces_a_share_of_an_attentions_input_projection_and_leaves_tokens_alone():
    torch.manual_seed(0)
    teacher = _trained_looking(_small_vit())
    student = copy.deepcopy(teacher)
    name = "encoder.layers.encoder_layer_0.self_attention"
    replaced = partial_reinit(student, {name: 0.5, "conv_proj": 0.0})
    assert 0.4 < replaced[name] < 0.6
    attention = dict(student.named_modules())[name]
    changed = attention.in_proj_weight != 0.5
    assert 0.4 < float(changed.float().mean()) < 0.6
    # Its out_proj is a Linear of its own: only a ratio for it changes it.
    assert torch.equal(attention.out_proj.bias, torch.full((32,), 0.5))
    for bare in ("class_token", "encoder.pos_embedding"):
        assert torch.equal(student.get_parameter(bare), teacher.get_parameter(bare))


def test_adaptive_ratios_on_a_vit_go_by_block():
    model = _small_vit(num_layers=4).eval()
    ratios = bcu_ratios(model, torch.rand(2, 3, 32, 32))
    assert ratios["conv_proj"] == 0.01 and ratios["heads.head"] == 0.1
    for block in range(4):
        prefix = f"encoder.layers.encoder_layer_{block}."
        mine = {k: v for k, v in ratios.items() if k.startswith(prefix)}
        # The attention, its out_proj (applied by the attention itself) and the two MLP layers.
        assert sorted(mine) == [prefix + s for s in ("mlp.0", "mlp.3", "self_attention",
                                                     "self_attention.out_proj")]
        assert set(mine.values()) == {GROUPS[block]}


@pytest.mark.parametrize("factory,stages", [
    (lambda: tvm.convnext_tiny(num_classes=10), ("features.1", "features.3", "features.5",
                                                 "features.7")),
    (lambda: tvm.swin_t(num_classes=10), ("features.1", "features.3", "features.5",
                                          "features.7")),
])
def test_adaptive_ratios_on_channels_last_nets_go_by_resolution(factory, stages):
    model = factory().eval()
    ratios = bcu_ratios(model, torch.rand(2, 3, 64, 64))
    assert ratios["features.0.0"] == 0.01 and ratios["head" if "head" in ratios
                                                      else "classifier.2"] == 0.1
    for group, stage in zip(GROUPS, stages):
        # Every conv and Linear of a stage's blocks, Swin's functional qkv and proj included.
        inside = {k: v for k, v in ratios.items() if k.startswith(stage + ".")}
        assert len(inside) >= 6 and set(inside.values()) == {group}, stage


def test_a_blocks_layers_share_its_stage_squeeze_excitation_included():
    model = tvm.efficientnet_b0(num_classes=10).eval()
    ratios = bcu_ratios(model, torch.rand(2, 3, 64, 64))
    # The MBConv blocks are features.1 to features.7 (features.0 and .8: a conv, BN, SiLU).
    blocks = {".".join(name.split(".")[:3]) for name in ratios
              if name.split(".")[:2] in [["features", str(i)] for i in range(1, 8)]}
    assert len(blocks) == 16
    for block in blocks:
        inside = {p for name, p in ratios.items() if name.startswith(block + ".")}
        assert len(inside) == 1, block  # expansion, depthwise, both SE convs and projection
    # Stages by resolution on a 64x64 input: 16x16, 8x8, 4x4, 2x2 after the stem's 32x32 stage.
    assert [ratios[f"features.{i}.0.block.0.0"] for i in (2, 3, 4, 6)] == [0.03, 0.09, 0.09,
                                                                          0.27]
