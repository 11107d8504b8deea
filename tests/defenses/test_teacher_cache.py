"""MEDIC's teacher cache: exact content fingerprints, the cached run equal to the uncached one,
and every way the cache cannot follow the loader detected (auto: warn and compute; True: raise)."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from bdfast.loaders import tensor_loader
from bdfast.defenses.medic import Medic, medic_clone
from bdfast.lab.models import digits_cnn
from bdfast.defenses.teacher_cache import fingerprint_weights, fingerprints, resolve_cache_dtype

FAST = dict(epochs=3, progress=False, seed=0, amp=False)


@pytest.fixture(scope="module")
def small(digits):
    torch.manual_seed(0)
    return digits_cnn().eval(), digits.clean[0][:48], digits.clean[1][:48]


class Rebatched:
    """Re-iterable: epoch e yields a fresh permutation of the images in batches of
    ``sizes[e % 2]``."""

    def __init__(self, x, y, sizes=(16, 12), augment=False):
        self.x, self.y, self.sizes, self.augment, self.epoch = x, y, sizes, augment, 0

    def __iter__(self):
        gen = torch.Generator().manual_seed(100 + self.epoch)
        order = torch.randperm(len(self.x), generator=gen)
        size = self.sizes[self.epoch % 2]
        self.epoch += 1
        for i in range(0, len(order), size):
            idx = order[i:i + size]
            x = self.x[idx]
            if self.augment:  # a random one-pixel shift: new images every epoch
                x = torch.roll(x, int(torch.randint(1, 3, (1,), generator=gen)), dims=-1)
            yield x, self.y[idx]


def assert_models(a, b, exact=False):
    for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        if exact:
            assert torch.equal(va, vb), name
        else:
            torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=name)


def test_fingerprints_are_exact_and_follow_the_image(small):
    _, x, y = small
    k1, k2 = fingerprints(x)
    # Independent of the batch: each image alone, and in reverse order.
    alone = torch.stack([torch.stack(fingerprints(x[i:i + 1])).squeeze(1) for i in range(len(x))])
    assert torch.equal(alone[:, 0], k1) and torch.equal(alone[:, 1], k2)
    rk1, _ = fingerprints(x.flip(0))
    assert torch.equal(rk1, k1.flip(0))
    # The layout does not matter, only the values.
    x4 = x.repeat(1, 3, 1, 1)
    assert torch.equal(fingerprints(x4.contiguous(memory_format=torch.channels_last))[0],
                       fingerprints(x4)[0])
    # Equal to the sum computed with Python integers modulo 2**64.
    w1, _ = fingerprint_weights(x[0].numel(), x.device)
    for i in (0, 7):
        bits = x[i].reshape(-1).view(torch.int32).tolist()
        exact = sum(b * w for b, w in zip(bits, w1.tolist())) % (1 << 64)
        assert int(k1[i]) % (1 << 64) == exact
    # One pixel's last bit changes both; a label changes both; all 48 images are distinct.
    bumped = x[:1].clone()
    bumped.view(torch.int32)[0, 0, 5, 5] += 1
    b1, b2 = fingerprints(bumped)
    assert b1 != k1[0] and b2 != k2[0]
    l1, l2 = fingerprints(x, y)
    m1, m2 = fingerprints(x, (y + 1) % 10)
    assert not torch.equal(l1, m1) and not torch.equal(l2, m2)
    assert len(set(k1.tolist())) == len(x)


@pytest.mark.parametrize("labels", ["auto", "teacher"])
def test_float32_cache_equals_the_uncached_run_on_a_shuffled_loader(small, labels):
    teacher, x, y = small
    runs = {}
    for mode in (False, True):
        # A fresh loader per run: the same seed gives both runs the same order of images.
        loader = tensor_loader(x, y, batch_size=16, shuffle=True, seed=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning allowed
            # The untrained teacher's students trip the collapse guard, by design.
            warnings.filterwarnings("ignore", message=".*the training collapsed")
            runs[mode] = Medic(**FAST, labels=labels, cache_teacher=mode,
                               cache_dtype=torch.float32).fit(teacher, loader)
    cached, plain = runs[True], runs[False]
    assert cached.cache["used"] and cached.cache["images"] == 48
    assert cached.cache["hits"] == 2 * 48  # epochs 2 and 3 never ran the teacher
    assert not plain.cache["used"]
    for a, b in zip(cached.history, plain.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert_models(cached.model, plain.model)


def test_rebatching_is_followed_and_batch_mean_gradients_are_rescaled(small):
    teacher, x, y = small
    options = dict(FAST, cache_dtype=torch.float32, reference_compat=True)
    cached = Medic(**options, cache_teacher=True).fit(teacher, Rebatched(x, y))
    plain = Medic(**options, cache_teacher=False).fit(teacher, Rebatched(x, y))
    assert cached.cache["used"] and cached.cache["hits"] == 96
    assert_models(cached.model, plain.model)


def test_16bit_caches_stay_close(small):
    teacher, x, y = small
    def loader():
        return tensor_loader(x, y, batch_size=16, shuffle=True, seed=1)

    plain = Medic(**FAST, cache_teacher=False).fit(teacher, loader())
    f32 = Medic(**FAST, cache_teacher=True, cache_dtype=torch.float32).fit(teacher, loader())
    # "auto" keeps float32 while the table fits the budget, and narrows to 16 bits when only
    # that fits (48 rows of the digits CNN: about 18.9 MB in float32, 9.4 MB in 16 bits).
    roomy = Medic(**FAST, cache_teacher=True).fit(teacher, loader())
    assert roomy.cache["bytes_per_image"] == f32.cache["bytes_per_image"]
    assert_models(roomy.model, f32.model, exact=True)
    tight = dict(cache_dtype="auto", cache_budget=12 << 20)
    for options in (tight, dict(cache_dtype=torch.bfloat16), dict(cache_dtype=torch.float16)):
        run = Medic(**FAST, cache_teacher=True, **options).fit(teacher, loader())
        assert run.cache["used"]
        assert run.cache["bytes_per_image"] < 0.6 * f32.cache["bytes_per_image"]
        assert run.history[-1]["loss"] == pytest.approx(plain.history[-1]["loss"], rel=0.05)


def test_t_past_the_float16_range_is_kept_in_float32(small):
    teacher, x, y = small
    loud = copy.deepcopy(teacher)
    with torch.no_grad():
        loud.features[0].weight.mul_(1e6)  # first conv outputs far beyond 65504
    loader = tensor_loader(x, y, batch_size=16)
    # 48 rows: 18.9 MB in float32, 14.2 MB with t widened to float32 and g in bfloat16.
    tight = dict(cache_teacher=True, cache_budget=16 << 20)  # "auto" narrows to 16 bits
    auto = Medic(**FAST, **tight).fit(loud, loader)
    f32 = Medic(**FAST, cache_teacher=True, cache_dtype=torch.float32).fit(loud, loader)
    normal = Medic(**FAST, **tight).fit(teacher, loader)
    assert auto.cache["used"] and all(math.isfinite(h["loss"]) for h in auto.history)
    # t in float32 (4 bytes), g in bfloat16 (2): three quarters of the float32 row's payload.
    payload = f32.cache["bytes_per_image"] - 24
    assert auto.cache["bytes_per_image"] - 24 == payload * 3 // 4
    assert normal.cache["bytes_per_image"] - 24 == payload // 2


def test_an_augmenting_loader_is_detected(small):
    teacher, x, y = small
    with pytest.warns(RuntimeWarning, match="teacher cache is off.*epoch 1 did not"):
        auto = Medic(**FAST).fit(teacher, Rebatched(x, y, augment=True))
    plain = Medic(**FAST, cache_teacher=False).fit(teacher, Rebatched(x, y, augment=True))
    assert not auto.cache["used"] and "epoch 1 did not" in auto.cache["reason_off"]
    assert_models(auto.model, plain.model, exact=True)
    with pytest.raises(ValueError, match="epoch 1 did not; cache_teacher=True needs a loader"):
        Medic(**FAST, cache_teacher=True).fit(teacher, Rebatched(x, y, augment=True))


def test_changed_labels_are_a_miss(small):
    teacher, x, y = small

    class Relabel(Rebatched):
        def __iter__(self):
            shift = self.epoch
            for xb, yb in super().__iter__():
                yield xb, (yb + shift) % 10

    with pytest.raises(ValueError, match="epoch 1 did not"):
        Medic(**FAST, cache_teacher=True).fit(teacher, Relabel(x, y))
    # With the teacher's labels the given ones do not matter, so nothing misses.
    run = Medic(**FAST, cache_teacher=True, labels="teacher").fit(teacher, Relabel(x, y))
    assert run.cache["used"]


def test_budget(small):
    teacher, x, y = small
    loader = tensor_loader(x, y, batch_size=16)
    with pytest.raises(ValueError, match="more than cache_budget=1000 bytes"):
        Medic(**FAST, cache_teacher=True, cache_budget=1000).fit(teacher, loader)
    with pytest.warns(RuntimeWarning, match="cache_budget"):
        auto = Medic(**FAST, cache_budget=1000).fit(teacher, loader)
    plain = Medic(**FAST, cache_teacher=False).fit(teacher, loader)
    assert not auto.cache["used"] and "cache_budget" in auto.cache["reason_off"]
    assert_models(auto.model, plain.model, exact=True)
    # A loader without len() is refused when the table grows past the budget.
    per_image = Medic(**{**FAST, "epochs": 1}).fit(teacher, loader).cache["bytes_per_image"]
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)]
    with pytest.raises(ValueError, match="needs .* x 32 images"):
        Medic(**FAST, cache_teacher=True,
              cache_budget=per_image * 20).fit(teacher, iter_only(batches))


class iter_only:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_options_are_checked(small):
    teacher, x, y = small
    with pytest.raises(ValueError, match="cache_teacher=True cannot be combined with augment"):
        medic_clone(teacher, [(x, y)], **FAST, cache_teacher=True, augment="crop")
    for option, value in (("cache_teacher", "yes"), ("cache_teacher", 1),
                          ("cache_teacher", None), ("cache_budget", 0),
                          ("cache_budget", 1.5), ("cache_dtype", "half"),
                          ("cache_dtype", torch.float64)):
        with pytest.raises(ValueError, match=option):
            medic_clone(teacher, [(x, y)], **{**FAST, option: value})
    for name in ("float32", "bfloat16", "float16"):  # names, as the command line gives them
        assert resolve_cache_dtype(name) is getattr(torch, name)
    # augment with "auto" simply runs without the cache.
    run = Medic(**{**FAST, "epochs": 2}, augment="crop").fit(teacher, [(x, y)])
    assert not run.cache["used"]
