"""bdfast.lab.trainer and bdfast.lab.metrics: metric definitions on a hand-made model and trainer
behaviour (the lab's backdoored models are checked in test_efficacy.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdfast.lab import attacks, metrics, models
from bdfast.defenses.augment import RandomCrop
from bdfast.lab.trainer import train

PATTERN = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
# Uneven class counts, so that every expected fraction below is a distinct, non-trivial number.
LABELS = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 7, 8, 9, 9])


class RuleModel(nn.Module):
    """A classifier whose answers are known in advance.

    It reads the true label from pixel (0, 0) (which holds y / 10), always mistakes 9 for 8, and,
    when the 16x16 badnets patch is present, answers the attack's target for even labels only:
    0 (all-to-one) or y + 1 (all-to-all). It records the train/eval mode of every call.
    """

    def __init__(self, all_to_all: bool = False):
        super().__init__()
        self.bn = nn.BatchNorm2d(1)  # a submodule whose mode must be handled too
        self.all_to_all = all_to_all
        self.modes = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append((self.training, self.bn.training))
        y = torch.round(x[:, 0, 0, 0] * 10).long()
        pred = torch.where(y == 9, torch.full_like(y, 8), y)
        triggered = (x[:, 0, 12:15, 12:15] == PATTERN).flatten(1).all(1)
        fire = triggered & (y % 2 == 0)
        pred = torch.where(fire, (y + 1) % 10 if self.all_to_all else torch.zeros_like(y), pred)
        return F.one_hot(pred, 10).float()


def _images(y: torch.Tensor) -> torch.Tensor:
    x = torch.full((len(y), 1, 16, 16), 0.5)
    x[:, 0, 0, 0] = y.float() / 10
    return x


def test_evaluate_all_to_one_matches_hand_count():
    model = RuleModel()
    x, y = _images(LABELS), LABELS
    result = metrics.evaluate(model, x, y, attack=attacks.get("badnets", target=0), batch_size=5)
    # 14 images, two 9s misread: ACC 12/14. The two target-class images are excluded: of the 12
    # others, the even ones (2, 2, 2, 4, 6, 8) go to the target, the odd ones 1, 3, 5, 7 stay right
    # and the two 9s become 8 (neither).
    assert result == pytest.approx({"acc": 12 / 14, "asr": 6 / 12, "ra": 4 / 12})
    assert metrics.evaluate(model, x, y) == pytest.approx({"acc": 12 / 14})


def test_evaluate_all_to_all_uses_every_image():
    model = RuleModel(all_to_all=True)
    result = metrics.evaluate(model, _images(LABELS), LABELS, attack=attacks.get("badnets_a2a"))
    # Every image counts; the 8 even ones go to y + 1, the odd ones 1, 3, 5, 7 stay right.
    assert result == pytest.approx({"acc": 12 / 14, "asr": 8 / 14, "ra": 4 / 14})


def test_evaluate_runs_in_eval_mode_and_restores_modes():
    model = RuleModel()
    model.train()
    model.bn.eval()  # a mixed state must come back exactly
    metrics.evaluate(model, _images(LABELS), LABELS, attack=attacks.get("badnets"))
    assert model.modes and all(m == (False, False) for m in model.modes)
    assert model.training and not model.bn.training


def test_evaluate_edge_cases_and_bad_input():
    model = RuleModel()
    zeros = torch.zeros(3, dtype=torch.long)
    result = metrics.evaluate(model, _images(zeros), zeros, attack=attacks.get("badnets"))
    assert result["acc"] == 1.0 and math.isnan(result["asr"]) and math.isnan(result["ra"])
    with pytest.raises(ValueError, match="y must"):
        metrics.evaluate(model, _images(LABELS), LABELS[:-1])
    with pytest.raises(ValueError, match="x must"):
        metrics.evaluate(model, torch.rand(0, 1, 16, 16), torch.zeros(0, dtype=torch.long))
    with pytest.raises(TypeError, match="attack"):
        metrics.evaluate(model, _images(LABELS), LABELS, attack="badnets")


def test_der():
    before = {"acc": 0.9, "asr": 1.0, "ra": 0.0}
    assert metrics.der(before, {"acc": 0.85, "asr": 0.1}) == pytest.approx((0.9 - 0.05 + 1) / 2)
    # Gains in accuracy and rises in ASR are clipped to 0.
    assert metrics.der(before, {"acc": 0.95, "asr": 1.0}) == pytest.approx(0.5)
    assert metrics.der({"acc": 0.9, "asr": 0.2}, {"acc": 0.9, "asr": 0.5}) == pytest.approx(0.5)
    assert metrics.der(before, {"acc": 0.9, "asr": 0.0}) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="after"):
        metrics.der(before, {"acc": 0.9})


def random_shift(x, max_shift, generator):
    """The trainer's augmentation: shifts of at most ``max_shift`` pixels, no flips."""
    return RandomCrop(flip=False, padding=max_shift, generator=generator)(x)


def test_the_trainers_shift_moves_each_image_by_at_most_max_shift_without_flipping():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(500, 1, 16, 16)
    x[:, 0, 5, 3] = 1.0
    out = random_shift(x, 1, g)
    assert out.shape == x.shape and torch.equal(out.sum((1, 2, 3)), x.sum((1, 2, 3)))
    _, _, rows, cols = torch.nonzero(out, as_tuple=True)
    offsets = set(zip((rows - 5).tolist(), (cols - 3).tolist()))
    assert offsets == {(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)}
    assert torch.equal(random_shift(x, 0, g), x)


def test_badnets_patch_survives_augmentation():
    g = torch.Generator().manual_seed(0)
    triggered = attacks.get("badnets").apply(torch.zeros(500, 1, 16, 16))
    # All four white pixels of the patch stay inside the image under one-pixel shifts ...
    assert torch.equal(random_shift(triggered, 1, g).sum((1, 2, 3)), torch.full((500,), 4.0))
    # ... and under the default two-pixel shifts of 16x16 images, the centre pixel always does
    # and most images keep the whole patch.
    out = random_shift(triggered, 2, g)
    kept = out.sum((1, 2, 3))
    assert float(kept.min()) >= 1.0 and float((kept == 4).float().mean()) > 0.5


def _small_run(digits, seed: int) -> nn.Module:
    torch.manual_seed(0)
    model = models.digits_cnn()
    return train(model, digits.train[0][:200], digits.train[1][:200], epochs=2, seed=seed,
                 progress=False)


def test_train_is_deterministic_with_a_seed_and_returns_eval_model(digits):
    a, b, c = _small_run(digits, 0), _small_run(digits, 0), _small_run(digits, 1)
    assert not a.training and not any(m.training for m in a.modules())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_train_works_in_place(digits):
    torch.manual_seed(0)
    model = models.digits_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = digits.train[0][:200], digits.train[1][:200]
    assert train(model, x, y, epochs=1, seed=0, progress=True) is model
    assert not torch.equal(before["classifier.weight"], model.classifier.weight)


def test_train_rejects_bad_input(digits):
    model = models.digits_cnn()
    x, y = digits.train[0][:200], digits.train[1][:200]
    with pytest.raises(ValueError, match="y must"):
        train(model, x, y.float(), progress=False)
    with pytest.raises(ValueError, match="x must"):
        train(model, x[:, 0], y, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train(model, x, y, epochs=0, progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        train(model, x, y, optimizer="rmsprop", progress=False)
    bad = x.clone()
    bad[:] = float("nan")
    with pytest.raises(FloatingPointError, match="epoch 1, step 1"):
        train(model, bad, y, progress=False)
