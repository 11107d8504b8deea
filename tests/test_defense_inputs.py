"""Bad input to the defenses and the lab's trainer: one clear sentence instead of a raw torch
error or a silently wrong result."""
from __future__ import annotations

import pytest
import torch

import bdfast
from bdfast.data import tensor_loader
from bdfast.models import digits_cnn

FAST = dict(epochs=1, progress=False, seed=0)


@pytest.fixture(scope="module")
def small(digits):
    """An untrained digits CNN (enough for input checks) and 48 clean images with labels."""
    torch.manual_seed(0)
    return digits_cnn().eval(), digits.clean[0][:48], digits.clean[1][:48]


DEFENSES = {
    "medic": lambda model, loader: bdfast.medic_clone(model, loader, **FAST),
    "bcu": lambda model, loader: bdfast.bcu_cleanse(model, loader, **FAST),
    "dde": lambda model, loader: bdfast.dde_prune(model, loader, progress=False),
    "mbns": lambda model, loader: bdfast.mbns_prune(model, loader, progress=False),
}


@pytest.mark.parametrize("defense", sorted(DEFENSES))
def test_images_in_0_255_are_refused_with_a_hint(small, defense):
    model, x, y = small
    with pytest.raises(ValueError, match="divide by 255"):
        DEFENSES[defense](model, tensor_loader(x * 255, y, batch_size=16))


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
