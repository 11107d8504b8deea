"""DDE and MBNS (docs/pruning.md): scores against a direct float64 computation, planted backdoor
channels, what pruning changes, the report, bad input and torch.distributed (what they do to the
lab's backdoored models is in test_efficacy.py)."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdfast import reference
from bdfast.defenses import pruning
from bdfast.lab import models
from bdfast.loaders import tensor_loader
from bdfast.defenses.dde import dde_prune
from bdfast.defenses.mbns import mbns_prune
from bdfast.defenses.pruning import PruneResult

BN_NAMES = ["bn1", "bn2", "short.1", "bn3"]


class Small(nn.Module):
    """conv-BN-functional in-place ReLU, a residual pair with a conv+BN shortcut, and a
    BatchNorm1d on pooled features that no conv feeds (its input is 2-D: no spatial max)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.short = nn.Sequential(nn.Conv2d(1, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.bn3 = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 3)

    def bn_inputs(self, x):
        """The four BN inputs, computed without hooks (for the direct computations)."""
        a1 = self.conv1(x)
        a2 = self.conv2(F.relu(self.bn1(a1)))
        s = self.short[0](x)
        a3 = F.relu(self.bn2(a2) + self.short[1](s)).mean((2, 3))
        return [a1, a2, s, a3]

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out)) + self.short(x)
        return self.fc(self.bn3(F.relu(out).mean((2, 3))))


def small_model(seed=0):
    """A Small with non-trivial gammas, betas and running statistics, in eval mode."""
    torch.manual_seed(seed)
    model = Small()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(5):
            model(torch.rand(32, 1, 8, 8) * 2)  # running statistics that differ from the data's
    return model.eval()


def images(n=120, seed=1):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def entropy64(col: np.ndarray, step: float) -> float:
    """docs/ops.md's default estimator of one column in float64 (NaN for a constant column)."""
    if col.std(ddof=1) == 0:
        return math.nan
    y = (col - col.mean()) / col.std(ddof=1)
    counts = np.bincount(np.floor((y - y.min()) / step).astype(np.int64))
    p = counts[counts > 0] / len(col)
    return float(-(p * np.log(p / step)).sum())


def scores(result: PruneResult) -> torch.Tensor:
    return torch.tensor([s for layer in result.report["layers"] for s in layer["scores"]],
                        dtype=torch.float64)


# --- scores against a direct float64 computation ------------------------------------------

def test_dde_scores_match_float64():
    model, x = small_model(), images(300)
    result = dde_prune(model, tensor_loader(x, batch_size=64), step=0.05, progress=False)
    with torch.no_grad():
        acts = copy.deepcopy(model).double().bn_inputs(x.double())
    phi = torch.cat([a.amax((2, 3)) if a.dim() == 4 else a for a in acts], dim=1).numpy()
    expected = torch.tensor([entropy64(phi[:, k], 0.05) for k in range(phi.shape[1])],
                            dtype=torch.float64)
    # Binning float32 activations may move a value sitting on a bin edge by one bin, which
    # changes h by O(1/N); everything else agrees to float32 rounding.
    assert torch.allclose(scores(result), expected, atol=2e-3, rtol=0, equal_nan=True)
    assert result.report["samples"] == 300


def test_dde_reference_compat_uses_released_estimator():
    model, x = small_model(), images(200)
    result = dde_prune(model, [x[:90], x[90:]], reference_compat=True, progress=False)
    with torch.no_grad():
        acts = model.bn_inputs(x)
    phi = torch.cat([a.amax((2, 3)) if a.dim() == 4 else a for a in acts], dim=1)
    offsets = torch.tensor([0, 8, 16, 24, 32])
    expected = reference.histogram_entropy(phi, offsets, step=0.01, reference_compat=True)
    assert torch.allclose(scores(result).float(), expected, atol=1e-5, equal_nan=True)


def test_mbns_scores_match_float64():
    model, x = small_model(), images(150)
    result = mbns_prune(model, tensor_loader(x, batch_size=40), progress=False)
    with torch.no_grad():
        acts = copy.deepcopy(model).double().bn_inputs(x.double())
    bns = dict(model.named_modules())
    expected = []
    for name, a in zip(BN_NAMES, acts):
        flat = a.transpose(0, 1).reshape(a.shape[1], -1)
        mu_p, var_p = flat.mean(1), flat.var(1, unbiased=True).clamp_min(1e-5)
        mu_q = bns[name].running_mean.double()
        var_q = bns[name].running_var.double().clamp_min(1e-5)
        expected.append(0.5 * torch.log(var_q / var_p)
                        + (var_p + (mu_p - mu_q) ** 2) / (2 * var_q) - 0.5)   # paper eq. (5)
    assert torch.allclose(scores(result), torch.cat(expected), rtol=1e-4, atol=1e-6)


# --- planted backdoor channels --------------------------------------------------------------

def identity_bn(channels=32):
    """1x1 identity conv -> BN: the BN input is the image itself, channel by channel."""
    model = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(channels)[:, :, None, None])
    return model.eval()


def test_dde_finds_planted_bimodal_channel():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 32, 4, 4, generator=gen)
    x[:40, 5] += 6.0   # 10% "poisoned" samples form a second mode on channel 5 only
    model = identity_bn()
    nn.init.constant_(model[1].bias, 0.25)
    result = dde_prune(model, [x[:250], (x[250:], torch.zeros(150))], progress=False)
    layer = result.report["layers"][0]
    assert layer["pruned"] == [5]
    assert layer["scores"][5] < layer["threshold"] < min(np.delete(layer["scores"], 5))
    assert result.model[1].weight[5] == 0 and result.model[1].bias[5] == 0.25


def test_mbns_finds_shifted_running_stats_and_dead_channel():
    model = identity_bn()
    with torch.no_grad():
        model[1].running_mean.zero_()
        model[1].running_var.fill_(1.0)
        model[1].running_mean[7] = 3.0   # trained on a mixture: running mean far from clean data
    x = torch.randn(200, 32, 4, 4, generator=torch.Generator().manual_seed(0))
    x[:, 9] = 0.0  # constant on clean data: variance floored at eps, so flagged instead of NaN
    layer = mbns_prune(model, [x], progress=False).report["layers"][0]
    assert layer["pruned"] == [7, 9]
    assert all(math.isfinite(s) for s in layer["scores"])


def test_dde_constant_neuron_is_nan_and_never_pruned():
    x = torch.randn(300, 32, 4, 4, generator=torch.Generator().manual_seed(0))
    x[:, 3] = 1.0
    layer = dde_prune(identity_bn(), [x], u=0.5, progress=False).report["layers"][0]
    assert math.isnan(layer["scores"][3]) and 3 not in layer["pruned"] and layer["pruned"]


# --- what pruning changes, and what it must not ------------------------------------------

@pytest.mark.parametrize("method", ["dde", "mbns"])
@pytest.mark.parametrize("zero_bias", [False, True])
def test_pruned_model_differs_only_in_pruned_channels(method, zero_bias):
    model = small_model()
    prune = dde_prune if method == "dde" else mbns_prune
    # u = 0.5 flags every channel half a std beyond its layer's mean: plenty to check.
    result = prune(model, [images()], u=0.5, zero_bias=zero_bias, progress=False)
    before, after = model.state_dict(), result.model.state_dict()
    pruned = {layer["name"]: layer["pruned"] for layer in result.report["layers"]}
    assert sum(map(len, pruned.values())) > 0
    for key, value in before.items():
        module, _, param = key.rpartition(".")
        expected = value.clone()
        if module in pruned and (param == "weight" or (param == "bias" and zero_bias)):
            expected[pruned[module]] = 0
        assert torch.equal(after[key], expected), key


@pytest.mark.parametrize("prune", [dde_prune, mbns_prune])
def test_user_model_untouched_unless_inplace(prune):
    model = small_model().train()          # BN in training mode is fine: a copy runs in eval
    model.bn3.eval()
    modes = [m.training for m in model.modules()]
    state = copy.deepcopy(model.state_dict())
    result = prune(model, [images()], u=0.5, progress=False)
    assert result.model is not model
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert [m.training for m in result.model.modules()] == modes

    result = prune(model, [images()], u=0.5, inplace=True, progress=False)
    assert result.model is model
    assert [m.training for m in model.modules()] == modes
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert changed and all(k.endswith(".weight") for k in changed)  # gammas only, stats kept


def test_report_structure():
    result = dde_prune(small_model(), [images()], max_samples=100, progress=True)
    report = result.report
    json.dumps(report)  # JSON-friendly for report.json
    assert report["method"] == "dde" and report["score"] == "entropy"
    assert report["options"] == {"u": 3.0, "step": 0.01, "reference_compat": False,
                                 "max_samples": 100, "acc_budget": 0.02, "zero_bias": False,
                                 "preset": None}
    assert report["u"] == 3.0 and report["sweep"] is None
    assert report["samples"] == 100 and report["seconds"] > 0
    assert [layer["name"] for layer in report["layers"]] == BN_NAMES
    # Pairing by forward order and tensor identity: the shortcut BN gets the shortcut conv, and
    # the BatchNorm1d on pooled features is fed by no conv.
    assert [layer["conv"] for layer in report["layers"]] == ["conv1", "conv2", "short.0", None]
    assert [layer["channels"] for layer in report["layers"]] == [8, 8, 8, 8]
    for layer in report["layers"]:
        assert set(layer) == {"name", "conv", "channels", "scores", "threshold", "pruned"}
        assert len(layer["scores"]) == layer["channels"]
        assert all(layer["scores"][c] < layer["threshold"] for c in layer["pruned"])
    assert report["num_layers"] == 4 and report["num_channels"] == 32
    assert report["num_pruned"] == sum(len(layer["pruned"]) for layer in report["layers"])

    report = mbns_prune(small_model(), [images()], progress=False).report
    assert report["method"] == "mbns" and report["score"] == "kl"
    assert report["options"] == {"u": 3.0, "acc_budget": 0.02, "zero_bias": False,
                                 "preset": None}


def test_max_samples_uses_the_first_images():
    model, x = small_model(), images(200)
    capped = dde_prune(model, tensor_loader(x, batch_size=64), max_samples=100, progress=False)
    direct = dde_prune(model, [x[:100]], progress=False)
    assert torch.allclose(scores(capped), scores(direct), rtol=0, atol=0, equal_nan=True)


# --- u="auto" -------------------------------------------------------------------------------

def labelled_images(model, n=160, seed=3):
    x = images(n, seed)
    with torch.no_grad():
        return x, model(x).argmax(1)


@pytest.mark.parametrize("method", ["dde", "mbns"])
@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("acc_budget", [0.0, 0.05, 0.3])
def test_auto_keeps_the_smallest_u_within_budget(method, labelled, acc_budget):
    model = small_model()
    x_val, y_val = labelled_images(model)
    val_loader = tensor_loader(x_val, y_val if labelled else None, batch_size=50)
    prune = dde_prune if method == "dde" else mbns_prune
    result = prune(model, [images(200)], u="auto", val_loader=val_loader, acc_budget=acc_budget,
                   progress=False)
    report = result.report
    sweep = report["sweep"]
    assert report["options"]["u"] == "auto" and report["options"]["acc_budget"] == acc_budget
    assert [s["u"] for s in sweep] == list(pruning.AUTO_U_GRID[:len(sweep)])
    # Smaller u prunes a superset, and the walk stops at the first u over budget.
    assert [s["pruned"] for s in sweep] == sorted(s["pruned"] for s in sweep)
    assert all(s["drop"] <= acc_budget for s in sweep[:-1])
    if sweep[-1]["drop"] > acc_budget:
        expected = sweep[-2]["u"] if len(sweep) > 1 else None
    else:
        assert len(sweep) == len(pruning.AUTO_U_GRID)
        expected = sweep[-1]["u"]
    assert report["u"] == expected
    # The pruning is exactly that of the chosen u, and its validation accuracy is the sweep's.
    if expected is None:
        assert report["num_pruned"] == 0
    else:
        fixed = prune(model, [images(200)], u=expected, progress=False)
        assert [l["pruned"] for l in report["layers"]] == \
            [l["pruned"] for l in fixed.report["layers"]]
        assert report["num_pruned"] == next(s["pruned"] for s in sweep if s["u"] == expected)
        with torch.no_grad():
            labels = y_val
            agree = (result.model(x_val).argmax(1) == labels).double().mean().item()
        assert agree == pytest.approx(next(s["val_acc"] for s in sweep if s["u"] == expected))


def test_auto_accepts_a_drop_of_exactly_the_budget():
    """A budget as a user writes it (0.02) must admit a drop of exactly that many images,
    although the difference of two count ratios can round just above it (1 - 0.98 =
    0.020000000000000018)."""
    model = small_model()
    x_val, y_val = labelled_images(model)
    for n in range(40, len(x_val) + 1):  # a validation size where the first cost rounds over
        val = [(x_val[:n], y_val[:n])]
        sweep = mbns_prune(model, [images(200)], u="auto", val_loader=val, acc_budget=0.99,
                           progress=False).report["sweep"]
        first_cost = next((s for s in sweep if s["drop"] > 0), None)
        if first_cost is not None:
            rounding = first_cost["drop"] - round(first_cost["drop"], 6)
            if 0 < rounding < 1e-12:
                break
    else:
        pytest.fail("no validation size gives a drop that rounds over its decimal value")
    budget = round(first_cost["drop"], 6)
    report = mbns_prune(model, [images(200)], u="auto", val_loader=val, acc_budget=budget,
                        progress=False).report
    assert report["u"] <= first_cost["u"]


def test_auto_prunes_nothing_when_even_the_first_u_is_over_budget(monkeypatch):
    model = small_model()
    monkeypatch.setattr(pruning, "AUTO_U_GRID", (0.05,))  # prunes about half of every layer
    x_val, y_val = labelled_images(model)
    result = mbns_prune(model, [images(200)], u="auto", val_loader=[(x_val, y_val)],
                        acc_budget=0.0, progress=False)
    assert result.report["sweep"][0]["drop"] > 0
    assert result.report["u"] is None and result.report["num_pruned"] == 0
    assert all(math.isnan(layer["threshold"]) for layer in result.report["layers"])
    assert all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(),
                                                 model.state_dict().values()))


def test_mbns_auto_holds_out_the_second_half_of_each_batch():
    model, x = small_model(), images(200)
    batches = [x[:64], x[64:128], x[128:]]
    auto = mbns_prune(model, batches, u="auto", progress=False)
    statistics = [b[:len(b) - len(b) // 2] for b in batches]
    direct = mbns_prune(model, statistics, progress=False)
    assert auto.report["samples"] == sum(len(b) for b in statistics) == 100
    assert torch.equal(scores(auto), scores(direct))
    assert auto.report["sweep"]


def test_auto_never_touches_the_users_model():
    model = small_model()
    state = copy.deepcopy(model.state_dict())
    x_val, y_val = labelled_images(model)
    dde_prune(model, [images()], u="auto", val_loader=[(x_val, y_val)], acc_budget=0.5,
              progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("options, match", [
    ({"u": "auto"}, "needs val_loader"),
    ({"u": "AUTO"}, "u must be"),
    ({"u": "auto", "val_loader": [], "acc_budget": 0.02}, "empty"),
    ({"u": "auto", "val_loader": [torch.ones(4, 1, 8, 8, dtype=torch.long)]}, "floating-point"),
    ({"acc_budget": 1.0}, "acc_budget"), ({"acc_budget": -0.1}, "acc_budget"),
    ({"acc_budget": True}, "acc_budget"),
])
def test_bad_auto_options(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        dde_prune(small_model(), [images()], progress=False, **options)


# --- bad input ------------------------------------------------------------------------------

def no_bn():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())


@pytest.mark.parametrize("prune", [dde_prune, mbns_prune])
@pytest.mark.parametrize("model, loader, options, error, match", [
    (no_bn, [images()], {}, ValueError, "no BatchNorm"),
    (small_model, [], {}, ValueError, "empty"),
    (small_model, [images(1)], {}, ValueError, "at least 2"),
    (small_model, images(), {}, TypeError, "not a single tensor"),
    (small_model, ["images"], {}, TypeError, "loader must yield tensors"),
    (small_model, [torch.ones(4, 1, 8, 8, dtype=torch.long)], {}, TypeError, "floating-point"),
    (small_model, [images()], {"u": 0}, ValueError, "u must be"),
    (small_model, [images()], {"u": float("nan")}, ValueError, "u must be"),
    (small_model, [images()], {"u": True}, ValueError, "u must be"),
    (small_model, [images()], {"zero_bias": 1}, TypeError, "zero_bias"),
    (lambda: "model", [images()], {}, TypeError, "torch.nn.Module"),
])
def test_bad_input(prune, model, loader, options, error, match):
    with pytest.raises(error, match=match):
        prune(model(), loader, progress=False, **options)


class Unreadable:
    """A loader that must not be read: iterating it fails the test."""

    def __iter__(self):
        raise AssertionError("the loader was iterated")


@pytest.mark.parametrize("prune", [dde_prune, mbns_prune])
@pytest.mark.parametrize("model, norms", [
    (models.gn_resnet, "(it normalises with GroupNorm)"),
    (models.convnext_lab, "(it normalises with LayerNorm2d and LayerNorm)"),
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, affine=True)),
     "(it normalises with InstanceNorm2d)"),
    (models.plain_cnn, None),
])
@pytest.mark.parametrize("u", [3.0, "auto"])
def test_no_batchnorm_fails_at_once_and_points_to_medic_and_bcu(prune, model, norms, u):
    # Neither loader is read: the model is refused before any pass over the data.
    with pytest.raises(ValueError) as error:
        prune(model(), Unreadable(), u=u, val_loader=Unreadable(), progress=False)
    message = str(error.value)
    assert message.startswith(f"{prune.__name__} scores and prunes BatchNorm channels, but the "
                              "model has no BatchNorm layer")
    assert "bdfast.medic_clone (MEDIC) or bdfast.bcu_cleanse (BCU)" in message
    assert "\n" not in message and ". " not in message  # one sentence
    if norms is None:
        assert "normalises" not in message
    else:
        assert norms in message


@pytest.mark.parametrize("options, match", [
    ({"step": 0}, "step must be"), ({"step": float("inf")}, "step must be"),
    ({"max_samples": 1}, "max_samples"), ({"max_samples": 2.5}, "max_samples"),
    ({"reference_compat": "yes"}, "reference_compat"),
])
def test_bad_dde_options(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        dde_prune(small_model(), [images()], progress=False, **options)


def test_bn_without_gamma_or_running_stats():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False))
    with pytest.raises(ValueError, match="affine=False"):
        dde_prune(model, [images()], progress=False)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        mbns_prune(model, [images()], progress=False)


@pytest.mark.parametrize("prune", [dde_prune, mbns_prune])
def test_non_finite_activations_stop_before_pruning(prune):
    model, x = small_model(), images()
    x[3, 0, 2, 2] = float("nan")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(FloatingPointError, match="bn1"):
        prune(model, [x], inplace=True, progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# --- torch.distributed: shards merged exactly -----------------------------------------------

def _ddp_worker(rank, world, store, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        x = images(150)
        shard = x[:70] if rank == 0 else x[70:]      # unequal shards
        dde = dde_prune(small_model(), [shard[:40], shard[40:]], progress=False).report
        mbns = mbns_prune(small_model(), [shard], progress=False).report
        if rank == 0:
            torch.save({"dde": dde, "mbns": mbns}, out)
    finally:
        dist.destroy_process_group()


def test_distributed_shards_give_the_single_process_result(tmp_path):
    out = tmp_path / "reports.pt"
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(out)),
                                nprocs=2)
    ranked = torch.load(out)
    x = images(150)
    dde = dde_prune(small_model(), [x], progress=False).report
    mbns = mbns_prune(small_model(), [x], progress=False).report
    assert ranked["dde"]["samples"] == ranked["mbns"]["samples"] == 150
    for got, want in ((ranked["dde"], dde), (ranked["mbns"], mbns)):
        for g, w in zip(got["layers"], want["layers"]):
            assert np.allclose(g["scores"], w["scores"], rtol=1e-5, atol=1e-7, equal_nan=True)
            assert g["pruned"] == w["pruned"]
