"""MEDIC on transformer and channels-last nets: the feature axis of every hooked output
(bdfast.hooks.feature_axes), statistics per feature, hooking only what runs, and a whole run."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bdfast.hooks import Tap, feature_axes, select_layers
from bdfast.defenses.medic import Medic, MedicConfig, MedicStep, teacher_statistics
from bdfast.lab.models import digits_cnn
from bdfast.defenses.stats import ChannelMoments

FAST = dict(epochs=1, progress=False, seed=0, amp=False)
CPU = torch.device("cpu")


class TinyViT(nn.Module):
    """Patch conv, a bare class token, one pre-norm encoder block (nn.MultiheadAttention, an
    MLP with GELU) and a Linear head: 8 x 8 images make 4 patches, so 5 tokens of 12 features."""

    def __init__(self, dim: int = 12, classes: int = 3):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 4, stride=4)
        self.cls = nn.Parameter(0.1 * torch.randn(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)  # [B, 4, dim]
        h = torch.cat([self.cls.expand(len(h), -1, -1), h], dim=1)
        n = self.norm1(h)
        h = h + self.attn(n, n, n)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(h[:, 0])


class Permute(nn.Module):
    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, then LayerNorm and the pointwise MLP on the channels-last map."""

    def __init__(self, dim: int):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.to_nhwc = Permute(0, 2, 3, 1)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.to_nchw = Permute(0, 3, 1, 2)

    def forward(self, x):
        h = self.fc2(self.act(self.fc1(self.norm(self.to_nhwc(self.dw(x))))))
        return x + self.to_nchw(h)


class TinyConvNeXt(nn.Module):
    """A 2 x 2 patchify stem (12 x 12 images: 6 x 6 maps of 8 channels), two blocks in a stage
    and a LayerNorm + Linear head on the pooled features."""

    def __init__(self, dim: int = 8, classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(1, dim, 2, stride=2)
        self.stage = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.norm(self.stage(self.stem(x)).mean((2, 3))))


def _data(size: int, n: int = 24, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _vit(seed: int = 0) -> TinyViT:
    torch.manual_seed(seed)
    return TinyViT().eval()


def _convnext(seed: int = 0) -> TinyConvNeXt:
    torch.manual_seed(seed)
    return TinyConvNeXt().eval()


def _features(model, names, x):
    """{name: (axis, feature count)} of the named outputs on x."""
    axes = feature_axes(model, names, x)
    with torch.no_grad(), Tap(model, list(axes)) as tap:
        model(x)
    return {n: (axes[n], v.shape[axes[n]]) for n, v in zip(axes, tap.values())}


def test_vit_axes_and_feature_counts():
    model, (x, _) = _vit(), _data(8)
    names = select_layers(model, "conv+norm+linear")
    assert "attn.out_proj" in names and "attn" in names  # the preset picks both
    # out_proj never runs (the attention applies its weights itself), so it has no axis.
    assert _features(model, names, x) == {
        "patch": (1, 12), "norm1": (2, 12), "attn": (2, 12), "norm2": (2, 12),
        "mlp.0": (2, 24), "mlp.2": (2, 12), "head": (1, 3)}
    # GELU and the MLP container take the axis of the Linear that feeds them.
    assert _features(model, ["mlp.1", "mlp"], x) == {"mlp.1": (2, 24), "mlp": (2, 12)}


def test_convnext_axes_and_feature_counts():
    model, (x, _) = _convnext(), _data(12)
    names = select_layers(model, "conv+norm+linear")
    expected = {"stem": (1, 8), "norm": (1, 8), "head": (1, 3)}
    for block in ("stage.0", "stage.1"):
        expected.update({f"{block}.dw": (1, 8), f"{block}.norm": (3, 8),
                         f"{block}.fc1": (3, 32), f"{block}.fc2": (3, 8)})
    assert _features(model, names, x) == expected
    # A block is NCHW again after its last Linear: its channels are on dim 1, not its rows.
    blocks = _features(model, select_layers(model, "block+linear"), x)
    assert {n: blocks[n] for n in ("stage.0", "stage.1", "head")} == {
        "stage.0": (1, 8), "stage.1": (1, 8), "head": (1, 3)}
    assert _features(model, ["stage.0.act", "stage.0.to_nhwc"], x) == {
        "stage.0.act": (3, 32), "stage.0.to_nhwc": (3, 8)}


def test_conv_nets_keep_their_channels_on_dim_1():
    torch.manual_seed(0)
    model = digits_cnn().eval()
    x = torch.rand(4, 1, 16, 16)
    for preset in ("conv+norm+linear", "act+linear", "block+linear"):
        names = select_layers(model, preset)
        assert feature_axes(model, names, x) == dict.fromkeys(names, 1), preset


class Ambiguous(nn.Module):
    """Patches to tokens by reshaping: [B, 4, 2, 2] -> [B, 4 tokens, 4 channels]."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(1, 4, 2, stride=2)
        self.tokens = nn.Identity()
        self.never = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.tokens(self.patch(x).flatten(2).transpose(1, 2))
        return self.head(h.mean(1))


def test_undecidable_axes_and_layers_that_never_run_fail_clearly():
    model, x = Ambiguous().eval(), torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"feature axis of layer 'tokens' \(output shape "
                                         r"\[2, 4, 4\]\).*features from 'patch'.*both dim 1 "
                                         r"and the last dim have 4 entries.*layers="):
        feature_axes(model, ["patch", "tokens"], x)
    assert feature_axes(model, ["patch", "never", "head"], x) == {"patch": 1, "head": 1}
    with pytest.raises(ValueError, match=r"never runs: \['never'\]"):
        feature_axes(model, ["patch", "never"], x, required=["never"])
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match=r"never runs: \['never'\]"):
        Medic(**FAST, layers=["patch", "never"]).fit(model, [(x, y)])
    with pytest.raises(ValueError, match="feature axis of layer 'tokens'"):
        Medic(**FAST, layers=["tokens"]).fit(model, [(x, y)])
    unbatched = SelfAttention(nn.MultiheadAttention(4, 1))  # batch_first=False: [L, B, E]
    with pytest.raises(ValueError, match="batch of 2 samples on dim 0.*batch_first=True"):
        feature_axes(unbatched, ["attn"], torch.rand(2, 3, 4), required=["attn"])
    # Chosen by a preset rather than by name, such a layer is left out.
    assert feature_axes(unbatched, ["attn"], torch.rand(2, 3, 4)) == {}


class Windows(nn.Module):
    """Attention inside windows, as Swin runs it: [B * windows, tokens, C] in between."""

    def __init__(self):
        super().__init__()
        self.qkv, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):  # x [B, 8, 4] -> 2 windows of 4 tokens per sample
        windows = self.qkv(x.reshape(-1, 4, 4))
        return self.head(windows.reshape(len(x), 8, 4).mean(1))


def test_a_preset_leaves_out_outputs_that_mix_samples_into_dim_0():
    model, x = Windows(), torch.rand(3, 8, 4)
    assert feature_axes(model, ["qkv", "head"], x) == {"head": 1}
    with pytest.raises(ValueError, match=r"layer 'qkv' \(output shape \[6, 4, 4\]\) does not "
                                         "hold the batch of 3 samples on dim 0"):
        feature_axes(model, ["qkv", "head"], x, required=["qkv"])


class SelfAttention(nn.Module):
    def __init__(self, attn: nn.MultiheadAttention):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return self.attn(x, x, x)[0]


@pytest.mark.parametrize("axis", [-1, 2])
def test_channel_moments_on_another_axis(axis):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(13, 5, 6, 7, generator=gen) * 3 + 1  # features on the last dim, 7
    if axis == 2:
        x = x.transpose(2, 3)  # the same features on dim 2, not contiguous
    moments = ChannelMoments(axis)
    for part in (x[:6], x[6:7], x[7:]):
        moments.update(part)
    direct = x.double().movedim(axis, -1).reshape(-1, 7)
    torch.testing.assert_close(moments.mean, direct.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moments.std(), direct.std(0), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="channels on dim 2 .*got shape \\[4, 5\\]"):
        ChannelMoments(2).update(torch.randn(4, 5))


def test_teacher_statistics_have_each_layers_feature_count():
    model, (x, _) = _convnext(), _data(12, 20)
    names = select_layers(model, "conv+norm+linear")
    axes = feature_axes(model, names, x[:4])
    mu, sigma = teacher_statistics(model, names, [x[:7], x[7:]], device=CPU, axes=axes)
    with torch.no_grad(), Tap(model, names) as tap:
        model(x)
    for name, value, m, s in zip(names, tap.values(), mu, sigma):
        flat = value.double().movedim(axes[name], -1).reshape(-1, value.shape[axes[name]])
        torch.testing.assert_close(m, flat.mean(0).float(), rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(s, flat.std(0).float(), rtol=1e-5, atol=1e-6, msg=name)
    assert [len(m) for m in mu] == [8] + [8, 8, 32, 8] * 2 + [8, 3]


def test_attention_output_is_captured_and_carries_gradients():
    model, (x, y) = _vit(), _data(8, 6)
    with Tap(model, ["attn", "mlp.0"]) as tap:
        model(x)
    attn = tap.values()[0]
    assert attn.shape == (6, 5, 12)
    grad = torch.autograd.grad(attn.square().sum(), model.attn.in_proj_weight)[0]
    assert grad.abs().sum() > 0
    # The frozen teacher's proxy gradient reaches the captured tensor, so it is the one the
    # rest of the model uses.
    teacher = _vit().requires_grad_(False)
    names = ["attn", "mlp.0", "head"]
    axes = feature_axes(teacher, names, x)
    mu, sigma = teacher_statistics(teacher, names, [x], device=CPU, axes=axes)
    step = MedicStep(teacher, _vit(1), names, mu, sigma, MedicConfig(amp=False), axes=axes)
    t, g, _ = step.teacher_outputs(x, y)
    assert [v.shape for v in t] == [(6, 12, 5), (6, 24, 5), (6, 3)]  # features on dim 1
    assert all(gl.abs().sum() > 0 for gl in g)
    assert t[0].stride(1) == 1  # a view of the [B, L, C] output, not a copy


@pytest.mark.parametrize("make, size", [(_vit, 8), (_convnext, 12)], ids=["vit", "convnext"])
def test_medic_runs_on_transformer_and_channels_last_nets(make, size):
    teacher, (x, y) = make(), _data(size, 32)
    loader = [(x[:16], y[:16]), (x[16:], y[16:])]
    runs = {cache: Medic(**dict(FAST, epochs=2), cache_teacher=cache, layers="conv+norm+linear")
            .fit(teacher, loader, student=make(1)) for cache in (False, True)}
    plain, cached = runs[False], runs[True]
    assert "attn.out_proj" not in plain.layers
    if make is _vit:
        assert "attn" in plain.layers
    assert cached.cache["hits"] == 32  # epoch 2 read the token / channels-last rows back
    # The float32 cache holds the same t and g, so the runs agree to rounding.
    for epoch in range(2):
        assert cached.history[epoch]["loss"] == pytest.approx(plain.history[epoch]["loss"],
                                                              rel=1e-5)
    assert plain.history[1]["loss"] != plain.history[0]["loss"]
    auto = Medic(**FAST).fit(teacher, loader, student=make(1))
    # A transformer (here: an nn.MultiheadAttention) gets the paper's layers (docs/medic.md).
    expected = "conv+norm+linear" if make is _vit else "act+linear"
    assert auto.layer_preset == expected and auto.layers


@pytest.fixture(scope="module")
def torchvision_models():
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    vit = models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                   hidden_dim=8, mlp_dim=16, num_classes=3).eval()
    config = models.convnext.CNBlockConfig
    convnext = models.ConvNeXt([config(8, 16, 1), config(16, None, 1)], num_classes=3).eval()
    return vit, convnext


def test_torchvision_vit_and_convnext(torchvision_models):
    vit, convnext = torchvision_models
    x = torch.rand(3, 3, 16, 16)
    names = select_layers(vit, "act+linear")
    axes = feature_axes(vit, names, x)
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj" not in axes
    assert axes["encoder.layers.encoder_layer_0.self_attention"] == 2
    assert axes["encoder.layers.encoder_layer_0.mlp.1"] == 2  # GELU on [3, 5 tokens, 16]
    assert axes["heads.head"] == 1
    x = torch.rand(3, 3, 48, 48)  # 12 x 12 maps of 8 channels, then 6 x 6 of 16
    names = select_layers(convnext, "conv+norm+linear")
    found = _features(convnext, names, x)
    # torchvision's LayerNorm2d permutes inside: its channels are on dim 1.
    assert found["features.0.1"] == (1, 8) and found["features.2.0"] == (1, 8)
    assert found["features.1.0.block.2"] == (3, 8) and found["features.1.0.block.3"] == (3, 32)
    assert found["features.3.0.block.5"] == (3, 16) and found["classifier.0"] == (1, 16)
    assert found["features.2.1"] == (1, 16)
    # On 8 x 8 maps of 8 channels the shapes cannot tell whether a block's Linear output was
    # permuted back before the LayerNorm2d: a clear error, not rows taken for channels.
    with pytest.raises(ValueError, match=r"feature axis of layer 'features.2.0' \(output shape "
                                         r"\[3, 8, 8, 8\]\).*both dim 1 and the last dim"):
        feature_axes(convnext, names, torch.rand(3, 3, 32, 32))
