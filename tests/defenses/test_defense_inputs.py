"""Bad input to the defenses and the lab's trainer: one clear sentence instead of a raw torch
error or a silently wrong result."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bdfast
from bdfast import defenses
from bdfast.loaders import tensor_loader
from bdfast.lab.models import digits_cnn

FAST = dict(epochs=1, progress=False, seed=0)


@pytest.fixture(scope="module")
def small(digits):
    """An untrained digits CNN (enough for input checks) and 48 clean images with labels."""
    torch.manual_seed(0)
    return digits_cnn().eval(), digits.clean[0][:48], digits.clean[1][:48]


DEFENSES = defenses.names()


def run(defense: str, model: nn.Module, loader) -> nn.Module:
    """``defense`` through the registry, with ``loader`` as the data it wants."""
    declared = defenses.get(defense)
    data = {"clean" if declared.data == "clean" else "train": loader}
    budget = {"epochs": 1} if declared.trains else {}
    return defenses.run(defense, model, seed=0, progress=False, **data, **budget).model


@pytest.mark.parametrize("defense", DEFENSES)
def test_images_in_0_255_are_refused_with_a_hint(small, defense):
    model, x, y = small
    with pytest.raises(ValueError, match="divide by 255"):
        run(defense, model, tensor_loader(x * 255, y, batch_size=16))


def test_train_and_evaluate_refuse_images_in_0_255(small):
    model, x, y = small
    with pytest.raises(ValueError, match="divide by 255"):
        bdfast.train(model, x * 255, y, epochs=1, progress=False)
    with pytest.raises(ValueError, match="divide by 255"):
        bdfast.evaluate(model, x * 255, y)


def test_standardised_images_are_accepted(small):
    # (x - mean) / std has negative values and a maximum of a few units: not 0..255 pixels.
    model, x, y = small
    standardised = (x - x.mean()) / x.std()
    assert float(standardised.max()) > 2
    assert 0.0 <= bdfast.evaluate(model, standardised, y)["acc"] <= 1.0


# --- the user's hooks ---------------------------------------------------------------------------

@pytest.mark.parametrize("defense", DEFENSES)
def test_user_hooks_do_not_fire_inside_a_defense(small, defense):
    model, x, y = small
    model = copy.deepcopy(model)
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append("forward"))
    model.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda module, args, out: calls.append("conv"))
    result = run(defense, model, tensor_loader(x, y, batch_size=16))
    cleaned = getattr(result, "model", result)
    assert calls == []
    # The returned copy carries none of them; the user's model keeps all of them.
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in cleaned.modules())
    assert len(model._forward_hooks) == 1 and len(model._forward_pre_hooks) == 1
    model(x[:2])
    assert calls.count("forward") == 1 and calls.count("conv") > 0


def test_inplace_pruning_sets_the_hooks_aside_and_keeps_them(small):
    model, x, _ = small
    model = copy.deepcopy(model)
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(1))
    result = bdfast.mbns_prune(model, tensor_loader(x, batch_size=16), inplace=True,
                               progress=False)
    assert result.model is model and calls == []
    model(x[:2])
    assert calls == [1]


# --- the last update is checked -----------------------------------------------------------------

def test_train_with_an_infinite_lr_fails_instead_of_returning_nan_weights(small):
    model, x, y = small
    # One step: the loss before it is finite, the update after it is not.
    with pytest.raises(FloatingPointError, match="non-finite"):
        bdfast.train(copy.deepcopy(model), x[:32], y[:32], epochs=1, batch_size=64,
                     lr=float("inf"), progress=False)


def test_fit_checks_the_parameters_after_the_last_update(small):
    from bdfast.defenses.distill import fit
    model, x, y = small
    student = copy.deepcopy(model)
    optimizer = torch.optim.SGD(student.parameters(), lr=float("inf"))

    def step(net, xb, yb, epoch):
        return torch.nn.functional.cross_entropy(net(xb), yb)

    with pytest.raises(FloatingPointError, match="non-finite"):
        fit(student, [(x[:32], y[:32])], step, optimizer, epochs=1, device=torch.device("cpu"),
            progress=False)


# --- MBNS names the broken BatchNorm layer ------------------------------------------------------

@pytest.mark.parametrize("broken", ["inf running_mean", "nan running_var",
                                    "negative running_var"])
@pytest.mark.parametrize("prune", [bdfast.mbns_prune, bdfast.dde_prune])
def test_broken_running_statistics_name_their_layer(small, broken, prune):
    model, x, _ = small
    model = copy.deepcopy(model)
    name, bn = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)][1]
    with torch.no_grad():
        if broken == "inf running_mean":
            bn.running_mean[3] = float("inf")
        elif broken == "nan running_var":
            bn.running_var[3] = float("nan")
        else:
            bn.running_var[3] = -1.0
    with pytest.raises(ValueError, match=f"BatchNorm layer '{name}' has broken running"):
        prune(model, tensor_loader(x, batch_size=16), progress=False)


# --- one sentence instead of a raw torch error --------------------------------------------------

@pytest.mark.parametrize("defense", ["medic", "bcu"])
def test_a_bare_tensor_is_not_a_loader(small, defense):
    model, x, _ = small
    with pytest.raises(TypeError, match="tensor_loader"):
        defenses.get(defense).run(model, x, **FAST)


class TupleModel(nn.Module):
    """Returns (logits, features), as some detection-style or feature-returning models do."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x), x.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("defense", ["medic", "bcu"])
def test_a_model_returning_a_tuple_fails_in_one_sentence(small, defense):
    model, x, y = small
    with pytest.raises(ValueError, match="one logits tensor"):
        run(defense, TupleModel(model), tensor_loader(x, y, batch_size=16))


@pytest.mark.parametrize("defense", DEFENSES)
@pytest.mark.parametrize("mismatch", ["dtype", "channels", "NHWC"])
def test_images_the_model_cannot_take_fail_in_one_sentence(small, defense, mismatch):
    model, x, y = small
    images = {"dtype": x.double(), "channels": x.repeat(1, 3, 1, 1),
              "NHWC": x.permute(0, 2, 3, 1).contiguous()}[mismatch]
    with pytest.raises(ValueError, match="the model cannot run on") as info:
        run(defense, model, tensor_loader(images, y, batch_size=16))
    message = str(info.value)
    assert "\n" not in message
    assert str(images.dtype) in message and str(list(images[:16].shape)) in message
    if mismatch == "NHWC":
        assert "transpose" in message
