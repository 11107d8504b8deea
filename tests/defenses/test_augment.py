"""The defenses' in-loop augmentation: every output image is a crop (and mirror) of its padded
input, the draws cover every offset, a seed reproduces them, and ``augment=`` reaches the step."""
from __future__ import annotations

import inspect
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

from bdfast.defenses.augment import RandomCrop, resolve_augment
from bdfast.defenses.bcu import bcu_cleanse
from bdfast.defenses.distill import fit
from bdfast.defenses.medic import MedicConfig, medic_clone
from bdfast.lab.models import digits_cnn
from support.devices import TORCH_DEVICES


def crops_of(image, pad, flip):
    """Every H x W window of ``image`` [C, H, W] zero-padded by ``pad``, and their mirrors."""
    _, height, width = image.shape
    padded = F.pad(image, (pad, pad, pad, pad))
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            window = padded[:, top:top + height, left:left + width]
            yield (top, left, False), window
            if flip:
                yield (top, left, True), window.flip(-1)


def which_crop(out, image, pad, flip):
    """The (top, left, mirrored) that gives ``out`` from ``image``; None if none does."""
    for where, window in crops_of(image, pad, flip):
        if torch.equal(out, window):
            return where
    return None


@pytest.mark.parametrize("device", TORCH_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, padding", [((5, 3, 16, 16), None), ((4, 1, 1, 1), None),
                                             ((3, 2, 7, 5), 3), ((2, 3, 9, 33), 0),
                                             ((1, 1, 28, 28), None)])
@pytest.mark.parametrize("flip", [False, True])
def test_every_image_is_a_window_of_its_padded_self(device, dtype, shape, padding, flip):
    torch.manual_seed(1)
    # Distinct values per pixel so that a window is identified by its content.
    x = (torch.randperm(torch.Size(shape).numel()).reshape(shape) + 1).to(device, dtype)
    crop = RandomCrop(flip=flip, padding=padding, seed=0)
    out = crop(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    pad = padding if padding is not None else max(1, round(min(shape[2:]) / 8))
    for i in range(shape[0]):
        assert which_crop(out[i].cpu(), x[i].cpu(), pad, flip) is not None, i


def test_draws_cover_every_offset_and_flip_and_a_seed_reproduces_them():
    x = (torch.arange(16 * 16, dtype=torch.float32) + 1).reshape(1, 1, 16, 16)
    x = x.expand(400, 1, 16, 16)
    out = RandomCrop(flip=True, seed=3)(x)
    seen = {which_crop(o, x[0], 2, True) for o in out}
    # 2-pixel padding: 5 x 5 offsets, each mirrored or not; symmetric windows don't occur here.
    assert seen == {(t, l, f) for t in range(5) for l in range(5) for f in (False, True)}
    assert torch.equal(out, RandomCrop(flip=True, seed=3)(x))
    assert not torch.equal(out, RandomCrop(flip=True, seed=4)(x))
    # Without a seed, torch's global RNG decides, so a seeded defense stays reproducible.
    torch.manual_seed(7)
    a = RandomCrop(flip=True)(x)
    torch.manual_seed(7)
    assert torch.equal(a, RandomCrop(flip=True)(x))


def test_channels_last_stays_channels_last():
    x = torch.rand(4, 3, 8, 8).to(memory_format=torch.channels_last)
    out = RandomCrop(flip=True, seed=0)(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, RandomCrop(flip=True, seed=0)(x.contiguous()))


def test_specs_and_bad_values():
    assert resolve_augment(False) is None and resolve_augment(None) is None
    assert resolve_augment(True) == "crop+flip" and resolve_augment("crop") == "crop"
    assert RandomCrop.from_spec(False) is None
    assert RandomCrop.from_spec("crop").flip is False and RandomCrop.from_spec(True).flip is True
    for bad in ("flip", 1, "Crop"):
        with pytest.raises(ValueError, match="augment must be"):
            resolve_augment(bad)
    with pytest.raises(ValueError, match="padding"):
        RandomCrop(flip=False, padding=-1)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        RandomCrop(flip=False)(torch.rand(3, 8))


def test_fit_hands_the_step_the_augmented_batch():
    x = (torch.arange(2 * 1 * 6 * 6, dtype=torch.float32) + 1).reshape(2, 1, 6, 6)
    seen = []
    model = torch.nn.Linear(36, 1)

    def step(net, batch, y, epoch):
        seen.append(batch)
        return net(batch.flatten(1)).sum()

    fit(model, [x], step, torch.optim.SGD(model.parameters(), lr=0.0), epochs=3,
        device=torch.device("cpu"), progress=False, augment=RandomCrop(flip=True, seed=0))
    expected = RandomCrop(flip=True, seed=0)
    for batch in seen:
        assert torch.equal(batch, expected(x))  # a fresh draw every epoch, in order
    assert not all(torch.equal(seen[0], b) for b in seen[1:])


@pytest.fixture(scope="module")
def small(digits):
    torch.manual_seed(0)
    return digits_cnn().eval(), digits.clean[0][:32], digits.clean[1][:32]


@pytest.mark.parametrize("defense", [medic_clone, bcu_cleanse])
def test_defenses_take_augment_and_reject_bad_values(small, defense):
    teacher, x, y = small
    options = dict(epochs=1, progress=False, seed=0, amp=False)
    loader = [(x[:16], y[:16]), (x[16:], y[16:])]
    plain = defense(teacher, loader, **options)
    cropped = defense(teacher, loader, augment="crop", **options)
    again = defense(teacher, loader, augment="crop", **options)
    def state(m):
        return torch.cat([p.flatten() for p in m.state_dict().values() if p.is_floating_point()])

    assert not torch.equal(state(plain), state(cropped))
    assert torch.equal(state(cropped), state(again))
    with pytest.raises(ValueError, match="augment must be"):
        defense(teacher, loader, augment="rotate", **options)


def test_medic_clone_is_medic_config_with_a_typed_signature():
    """medic_clone builds its MedicConfig from its own arguments by name."""
    parameters = inspect.signature(medic_clone).parameters
    options = {n: p.default for n, p in parameters.items() if p.kind is p.KEYWORD_ONLY}
    config = {f.name: f.default for f in fields(MedicConfig)}
    assert {n: v for n, v in options.items() if n != "student"} == config


def test_a_shared_generator_is_drawn_from():
    x = torch.rand(6, 1, 16, 16)
    shared = torch.Generator().manual_seed(3)
    crop = RandomCrop(flip=True, generator=shared)
    assert crop.generator is shared
    assert torch.equal(crop(x), RandomCrop(flip=True, seed=3)(x))
    # The next draw continues the shared stream.
    assert not torch.equal(crop(x), RandomCrop(flip=True, seed=3)(x))
