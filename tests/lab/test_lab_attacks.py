"""bdfast.lab.attacks: trigger placement and values, label rules, poison rates and input
handling."""
from __future__ import annotations

import math

import pytest
import torch

from bdfast.lab import attacks

ALL = ["badnets", "badnets_a2a", "blended", "sig", "wanet"]
PATTERN = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


def test_names_and_get():
    assert attacks.names() == ALL
    for name in ALL:
        attack = attacks.get(name, target=3)
        assert attack.name == name and attack.target == 3
        assert attack.all_to_all == (name == "badnets_a2a")
    with pytest.raises(ValueError, match="badnets"):
        attacks.get("nope")
    with pytest.raises(TypeError, match="blended"):
        attacks.get("blended", radius=3)
    with pytest.raises(ValueError, match="target"):
        attacks.get("badnets", target=10)
    with pytest.raises(ValueError, match="alpha"):
        attacks.get("blended", alpha=0)


@pytest.mark.parametrize("size", [16, 32])
def test_badnets_patch_is_3x3_near_the_bottom_right(size):
    attack = attacks.get("badnets")
    x = torch.full((2, 3, size, size), 0.5)
    out = attack.apply(x)
    changed = (out != x).any(0).any(0)
    rows, cols = torch.nonzero(changed, as_tuple=True)
    # One free pixel to the border, then the 3x3 grid: rows and cols size-4 .. size-2.
    assert rows.min() == size - 4 and rows.max() == size - 2
    assert cols.min() == size - 4 and cols.max() == size - 2
    patch = out[:, :, size - 4:size - 1, size - 4:size - 1]
    assert torch.equal(patch, PATTERN.expand_as(patch))


def test_badnets_patch_grows_on_large_images():
    out = attacks.get("badnets").apply(torch.full((1, 1, 64, 64), 0.5))
    patch = out[0, 0, 64 - 8:64 - 2, 64 - 8:64 - 2]  # cells of 2x2 pixels, one cell from the border
    assert torch.equal(patch, PATTERN.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert int((out != 0.5).sum()) == 36


def test_blended_formula_and_seeded_pattern():
    x = torch.rand(4, 3, 16, 16)
    attack = attacks.get("blended")
    p = attack.pattern(3, 16, 16)
    assert p.shape == (3, 16, 16) and float(p.min()) >= 0 and float(p.max()) < 1
    assert float(p.std()) > 0.2  # a real random pattern, not a constant
    torch.testing.assert_close(attack.apply(x), 0.8 * x + 0.2 * p)
    assert torch.equal(attacks.get("blended").pattern(3, 16, 16), p)
    assert not torch.equal(attacks.get("blended", pattern_seed=7).pattern(3, 16, 16), p)


def test_sig_is_a_horizontal_sinusoid():
    x = torch.full((2, 1, 16, 32), 0.5)
    out = attacks.get("sig").apply(x)
    j = torch.arange(32, dtype=torch.float32)
    wave = 20 / 255 * torch.sin(2 * math.pi * 6 * j / 32)
    torch.testing.assert_close(out, (0.5 + wave).expand_as(out))
    # Clipped to [0, 1] on dark and bright images.
    assert float(attacks.get("sig").apply(torch.zeros(1, 1, 8, 8)).min()) == 0.0
    assert float(attacks.get("sig").apply(torch.ones(1, 1, 8, 8)).max()) == 1.0


def test_wanet_is_a_small_fixed_smooth_warp():
    attack = attacks.get("wanet")
    h = w = 16
    grid = attack.grid(h, w)
    assert grid.shape == (1, h, w, 2) and float(grid.abs().max()) <= 1.0
    identity = torch.stack(torch.meshgrid(torch.linspace(-1, 1, w), torch.linspace(-1, 1, h),
                                          indexing="xy"), dim=-1)
    shift_px = (grid[0] - identity) * (w - 1) / 2
    # s = 0.5 with a control grid normalised to mean |.| = 1: sub-pixel moves of about s / 2.
    assert 0.05 < float(shift_px.abs().mean()) < 0.5
    assert float(shift_px.abs().max()) <= 0.5 * float(attack.control.abs().max()) * 1.1
    x = torch.rand(3, 2, h, w)
    out = attack.apply(x)
    assert torch.equal(out, attacks.get("wanet").apply(x))  # seeded field
    assert not torch.equal(out, attacks.get("wanet", field_seed=9).apply(x))
    assert 0 < float((out - x).abs().mean()) < 0.2
    # A constant image stays constant away from the border (warping only moves pixels).
    flat = attack.apply(torch.full((1, 1, h, w), 0.3))
    torch.testing.assert_close(flat[..., 2:-2, 2:-2], torch.full((1, 1, h - 4, w - 4), 0.3))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_apply_keeps_dtype_range_and_input(name, dtype):
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32).to(dtype)
    before = x.clone()
    out = attacks.get(name).apply(x)
    assert out.dtype == dtype and out.shape == x.shape and out.data_ptr() != x.data_ptr()
    assert torch.equal(x, before)  # never in place
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    ref = attacks.get(name).apply(x.float())
    tol = 1e-6 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL)
def test_apply_on_cuda_matches_cpu(name):
    x = torch.rand(4, 3, 32, 32)
    out = attacks.get(name).apply(x.cuda())
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), attacks.get(name).apply(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad, error", [(torch.rand(1, 16, 16), ValueError),
                                        (torch.zeros(1, 1, 16, 16, dtype=torch.uint8), TypeError),
                                        ([[0.0]], TypeError)])
def test_apply_rejects_bad_input(bad, error):
    with pytest.raises(error, match="x must"):
        attacks.get("badnets").apply(bad)


def test_target_labels():
    y = torch.tensor([0, 1, 5, 9])
    assert attacks.get("badnets", target=2).target_labels(y, 10).tolist() == [2, 2, 2, 2]
    assert attacks.get("badnets_a2a").target_labels(y, 10).tolist() == [1, 2, 6, 0]


@pytest.mark.parametrize("name", ["badnets", "blended", "wanet"])
def test_poison_all_to_one(digits, name):
    x, y = digits.train
    x0, y0 = x.clone(), y.clone()
    attack = attacks.get(name)
    xp, yp, mask = attack.poison(x, y, rate=0.1, seed=0)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # inputs untouched
    assert mask.dtype == torch.bool and mask.shape == y.shape
    assert int(mask.sum()) == round(0.1 * len(y))
    assert not bool((y[mask] == attack.target).any())  # only other classes are poisoned
    assert bool((yp[mask] == attack.target).all())
    assert torch.equal(yp[~mask], y[~mask])
    torch.testing.assert_close(xp[mask], attack.apply(x[mask]))
    changed = (xp != x).flatten(1).any(1)
    if name == "wanet":
        # Noise mode: twice as many other images are warped with noise and keep their labels.
        cross = changed & ~mask
        assert int(cross.sum()) == 2 * int(mask.sum())
        assert not torch.allclose(xp[cross], attack.apply(x[cross]))
    else:
        assert torch.equal(changed, mask)
    again = attack.poison(x, y, rate=0.1, seed=0)
    other = attack.poison(x, y, rate=0.1, seed=1)
    assert torch.equal(again[0], xp) and torch.equal(again[2], mask)
    assert not torch.equal(other[2], mask)


def test_poison_all_to_all(digits):
    x, y = digits.train
    attack = attacks.get("badnets_a2a")
    xp, yp, mask = attack.poison(x, y, rate=0.2, seed=0)
    assert int(mask.sum()) == round(0.2 * len(y))
    assert len(set(y[mask].tolist())) == 10  # any class may be poisoned, the target class too
    assert torch.equal(yp[mask], (y[mask] + 1) % 10)
    assert torch.equal(yp[~mask], y[~mask])


def test_sig_is_clean_label(digits):
    x, y = digits.train
    attack = attacks.get("sig", target=4)
    xp, yp, mask = attack.poison(x, y, rate=0.05, seed=0)
    assert torch.equal(yp, y)  # labels are never changed
    assert bool((y[mask] == 4).all())
    assert int(mask.sum()) == round(0.05 * len(y))
    torch.testing.assert_close(xp[mask], attack.apply(x[mask]))
    # A rate asking for more than the target class holds poisons the whole target class.
    _, _, all_mask = attack.poison(x, y, rate=0.5, seed=0)
    assert torch.equal(all_mask, y == 4)


def test_poison_rate_extremes(digits):
    x, y = digits.clean
    attack = attacks.get("badnets")
    xp, yp, mask = attack.poison(x, y, rate=0.0)
    assert not bool(mask.any()) and torch.equal(xp, x) and torch.equal(yp, y)
    _, _, mask = attack.poison(x, y, rate=1.0)
    assert torch.equal(mask, y != 0)


def test_poison_rejects_bad_input(digits):
    x, y = digits.clean
    attack = attacks.get("badnets")
    with pytest.raises(ValueError, match="rate"):
        attack.poison(x, y, rate=1.5)
    with pytest.raises(ValueError, match="y must"):
        attack.poison(x, y[:-1])
    with pytest.raises(TypeError, match="int64"):
        attack.poison(x, y.float())
    with pytest.raises(ValueError, match="num_classes"):
        attack.poison(x, y + 5)
    with pytest.raises(ValueError, match="target-class"):
        attacks.get("sig", target=0).poison(x[y != 0], y[y != 0])
