"""preset="backdoorbench" of DDE and MBNS (docs/pruning.md, "BackdoorBench preset"): scores and
pruned channels against a direct re-statement of BackdoorBench's defense/ep.py and
defense/bnp.py, what the preset reads and zeroes, and its option errors."""
from __future__ import annotations

import copy
import math
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdfast import defenses
from bdfast.lab import models
from bdfast.defenses.dde import dde_prune
from bdfast.defenses.mbns import mbns_prune
from bdfast.defenses.pruning import PruneResult

PRESET = "backdoorbench"


class Mixed(nn.Module):
    """BatchNorm2d layers of 6, 17, 17, 1 and 3 channels (one on a shortcut, one normalising a
    sum, as a pre-activation block's BN does) and a BatchNorm1d, which the preset leaves out."""

    def __init__(self, in_channels: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 17, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(17)
        self.short = nn.Sequential(nn.Conv2d(in_channels, 17, 1, stride=2, bias=False),
                                   nn.BatchNorm2d(17))
        self.bn_sum = nn.BatchNorm2d(17)
        self.conv3 = nn.Conv2d(17, 1, 1)
        self.bn3 = nn.BatchNorm2d(1)
        self.conv4 = nn.Conv2d(17, 3, (1, 3))
        self.bn4 = nn.BatchNorm2d(3)
        self.head_bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn_sum(self.bn2(self.conv2(out)) + self.short(x)))
        pooled = torch.cat([self.bn3(self.conv3(out)).mean((2, 3)),
                            F.relu(self.bn4(self.conv4(out))).mean((2, 3))], dim=1)
        return self.fc(self.head_bn(pooled))


def randomised(model: nn.Module, seed: int) -> nn.Module:
    """``model`` in eval mode with random gammas, betas and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
    return model.eval()


def mixed(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomised(Mixed(), seed)


def preact(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomised(models.preact_resnet18(num_classes=4, in_channels=1, width=4), seed)


# (model, first-batch shape): several image shapes and batch sizes.
CASES = {
    "mixed 7x10": (mixed, (48, 2, 7, 10)),
    "mixed 5x5": (lambda: mixed(1), (23, 2, 5, 5)),
    "preact 8x8": (preact, (32, 1, 8, 8)),
}


def images(shape, seed: int = 2) -> Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def bn2d_inputs(model: nn.Module, x: Tensor) -> Dict[str, Tensor]:
    """The input [B, C, H, W] of every BatchNorm2d of ``model`` on ``x``, by name."""
    inputs: Dict[str, Tensor] = {}
    work = copy.deepcopy(model).eval()
    handles = [m.register_forward_pre_hook(
        lambda module, args, name=name: inputs.__setitem__(name, args[0].clone()))
        for name, m in work.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        work(x)
    for handle in handles:
        handle.remove()
    return inputs


def bb_entropy(bn_input: Tensor, step: float = 0.1) -> Tensor:
    """ep.py's entropy of one layer's channels [C]: the spatial maxima, standardised per channel
    (unbiased std, float32), put in the open bins of one grid from the layer's minimum, with
    p = count / B and -sum p ln p."""
    phi = bn_input.amax(dim=(2, 3)).t()  # [C, B]
    y = (phi - phi.mean(1, keepdim=True)) / phi.std(1, keepdim=True)
    low = y.min()
    edges = low + (torch.arange(int((y.max() - low) / step) + 1, dtype=torch.float64)
                   * step).float()
    inside = (y[..., None] > edges[:-1]) & (y[..., None] < edges[1:])  # [C, B, bins]
    p = inside.sum(1).double() / y.shape[1]
    return -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(1)


def bb_kl(bn_input: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """bnp.py's divergence [C] of one layer: batch mean and unbiased variance over (B, H, W)
    against the running statistics, with the log of the variance ratio."""
    x = bn_input.double()
    mu, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
    mu_run, var_run = bn.running_mean.double(), bn.running_var.double()
    return (var_run / var).log() + (var + (mu - mu_run) ** 2) / (2 * var_run) - 0.5


def outliers(scores: Tensor, u: float, low: bool) -> List[int]:
    """The channels beyond mean -/+ u * (unbiased) std of their layer; none when a score is not
    finite (the layer's mean and std are not) or the layer has one channel (no std)."""
    if len(scores) < 2 or not bool(torch.isfinite(scores).all()):
        return []
    threshold = scores.mean() + (-u if low else u) * scores.std()
    return (scores < threshold if low else scores > threshold).nonzero().flatten().tolist()


def layers(result: PruneResult) -> Dict[str, dict]:
    return {layer["name"]: layer for layer in result.report["layers"]}


def check_pruned_state(model: nn.Module, result: PruneResult) -> None:
    """The result differs from ``model`` exactly in the pruned channels' gamma and beta."""
    pruned = {name: layer["pruned"] for name, layer in layers(result).items()}
    for key, value in model.state_dict().items():
        module, _, param = key.rpartition(".")
        expected = value.clone()
        if module in pruned and param in ("weight", "bias"):
            expected[pruned[module]] = 0
        assert torch.equal(result.model.state_dict()[key], expected), key


@pytest.mark.parametrize("case", CASES)
def test_dde_preset_is_backdoorbench_ep(case):
    build, shape = CASES[case]
    model, x = build(), images(shape)
    state = copy.deepcopy(model.state_dict())
    inputs = bn2d_inputs(model, x)
    for u in (0.5, 1.5):
        result = dde_prune(model, [x, images(shape, seed=3)], u=u, preset=PRESET,
                           progress=False)
        got = layers(result)
        assert list(got) == list(inputs)  # BatchNorm2d layers only, in registration order
        for name, bn_input in inputs.items():
            expected = bb_entropy(bn_input)
            assert torch.allclose(torch.tensor(got[name]["scores"], dtype=torch.float64),
                                  expected, rtol=0, atol=1e-5), name
            assert got[name]["pruned"] == outliers(expected, u, low=True), (name, u)
        assert result.report["samples"] == shape[0]
        check_pruned_state(model, result)
    assert sum(len(layer["pruned"]) for layer in got.values()) > 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", CASES)
def test_mbns_preset_is_backdoorbench_bnp(case):
    build, shape = CASES[case]
    model, x = build(), images(shape)
    inputs = bn2d_inputs(model, x)
    bns = dict(model.named_modules())
    for u in (0.5, 1.5):
        result = mbns_prune(model, [(x, torch.zeros(len(x))), images(shape, seed=3)], u=u,
                            preset=PRESET, progress=False)
        got = layers(result)
        assert list(got) == list(inputs)
        for name, bn_input in inputs.items():
            expected = bb_kl(bn_input, bns[name])
            assert torch.allclose(torch.tensor(got[name]["scores"], dtype=torch.float64),
                                  expected, rtol=1e-9, atol=1e-12), name
            assert got[name]["pruned"] == outliers(expected, u, low=False), (name, u)
        check_pruned_state(model, result)
    assert sum(len(layer["pruned"]) for layer in got.values()) > 0


@pytest.mark.parametrize("prune", [dde_prune, mbns_prune])
def test_preset_reads_the_first_batch_only(prune):
    x = images((30, 2, 6, 6))

    def batches():
        yield x
        raise AssertionError("the preset read a second batch")

    report = prune(mixed(), batches(), u=1.0, preset=PRESET, progress=False).report
    assert report["samples"] == 30 and report["options"]["preset"] == PRESET
    assert report["options"]["zero_bias"] is True


def test_one_channel_layer_prunes_nothing():
    x = images((40, 2, 6, 6))
    for prune in (dde_prune, mbns_prune):
        layer = layers(prune(mixed(), [x], u=0.5, preset=PRESET, progress=False))["bn3"]
        assert layer["channels"] == 1 and layer["pruned"] == []
        assert math.isnan(layer["threshold"])


def identity_bn(channels: int = 16) -> nn.Module:
    """1x1 identity conv -> BN: the BN input is the image itself, channel by channel."""
    model = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(channels)[:, :, None, None])
    return model.eval()


def test_dde_preset_constant_channel_is_nan_and_never_pruned():
    # BackdoorBench's ep.py stops on such a channel (int() of a NaN range); bdfast leaves it out.
    x = torch.rand(64, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    x[:, 4] = 0.5
    layer = dde_prune(identity_bn(), [x], u=0.5, preset=PRESET,
                      progress=False).report["layers"][0]
    assert math.isnan(layer["scores"][4]) and 4 not in layer["pruned"] and layer["pruned"]


def test_mbns_preset_zero_variance_leaves_its_layer_unpruned():
    model = nn.Sequential(identity_bn(), nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8)).eval()
    with torch.no_grad():
        model[0][1].running_mean[2] = 3.0
        model[2].running_mean.copy_(torch.linspace(-2, 2, 8))
    x = torch.rand(64, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    x[:, 5] = 0.5  # variance 0: an infinite KL, so BackdoorBench's layer mean is infinite
    first, second = layers(mbns_prune(model, [x], u=0.5, preset=PRESET,
                                      progress=False)).values()
    assert all(math.isnan(s) for s in first["scores"]) and first["pruned"] == []
    assert second["pruned"] and all(math.isfinite(s) for s in second["scores"])


@pytest.mark.parametrize("prune, options, match", [
    (dde_prune, {"step": 0.05}, r"sets step=0\.1 .*, so step=0\.05 contradicts it"),
    (dde_prune, {"max_samples": 20}, "max_samples=20 contradicts it"),
    (dde_prune, {"u": "auto", "val_loader": [images((8, 2, 6, 6))]}, "one fixed u"),
    (mbns_prune, {"u": "auto"}, "one fixed u"),
    (dde_prune, {"preset": "BackdoorBench"}, "unknown preset 'BackdoorBench'"),
    (mbns_prune, {"preset": 1}, "unknown preset 1"),
])
def test_preset_option_errors(prune, options, match):
    options = {"preset": PRESET, **options}
    with pytest.raises(ValueError, match=match) as error:
        prune(mixed(), [images((8, 2, 6, 6))], progress=False, **options)
    message = str(error.value)
    assert "\n" not in message and message.count(". ") == 0


@pytest.mark.parametrize("options", [{}, {"step": 0.01, "zero_bias": False},
                                     {"step": 0.1, "reference_compat": True, "zero_bias": True}])
def test_dde_options_at_their_default_or_the_presets_take_the_presets(options):
    report = dde_prune(mixed(), [images((30, 2, 6, 6))], preset=PRESET, progress=False,
                       **options).report
    assert report["options"] == {"u": 3.0, "step": 0.1, "reference_compat": True,
                                 "max_samples": None, "acc_budget": 0.02, "zero_bias": True,
                                 "preset": PRESET}


def test_preset_scores_batchnorm2d_only():
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4)).eval()
    for prune in (dde_prune, mbns_prune):
        with pytest.raises(ValueError, match="scores only BatchNorm2d layers, and the model's "
                                             "BatchNorm layers are BatchNorm1d"):
            prune(model, [torch.rand(8, 2, 2, 2)], preset=PRESET, progress=False)


def test_the_registry_passes_the_preset():
    assert all("preset" in defenses.get(name).options() for name in ("dde", "mbns"))
    x = images((40, 2, 6, 6))
    outcome = defenses.run("mbns", mixed(), clean=x, preset=PRESET, u=1.0, progress=False)
    assert outcome.report["options"]["preset"] == PRESET
