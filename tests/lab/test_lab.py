"""The lab's one home for backdoored models: what it trains, what its cache keys hold, and the one
source hash."""
from __future__ import annotations

import os

import pytest
import torch

from bdfast import lab
from bdfast.lab.data import FASHION_MNIST_ROOT


def weights(model):
    return torch.cat([v.flatten().float() for v in model.state_dict().values()])


def test_a_cached_model_is_the_trained_one_and_its_key_names_what_shapes_it(tmp_path):
    first = lab.backdoored("digits", "digits_cnn", "badnets", 1, epochs=1, cache=tmp_path)
    files = list(tmp_path.glob("*.pt"))
    assert [f.stem for f in files] == [first.key]
    for part in ("digits", "digits_cnn", "badnets", "s1", "e1", "native",
                 f"t{torch.get_num_threads()}", torch.backends.cpu.get_cpu_capability(),
                 lab.source_hash(lab.MODEL_SOURCES)):
        assert part in first.key
    again = lab.backdoored("digits", "digits_cnn", "badnets", 1, epochs=1, cache=tmp_path)
    assert torch.equal(weights(first.model), weights(again.model))
    assert not again.model.training
    other = lab.backdoored("digits", "digits_cnn", "badnets", 2, epochs=1, cache=tmp_path)
    assert other.key != first.key and not torch.equal(weights(first.model), weights(other.model))
    assert len(list(tmp_path.glob("*.pt"))) == 2 and not list(tmp_path.glob("*.tmp"))


def test_the_poisoned_set_is_what_the_attack_made():
    model = lab.backdoored("digits", "digits_cnn", "blended", 0, epochs=1)
    x, y, mask = model.poisoned
    clean_x, clean_y = lab.lab_data("digits").train
    assert x.shape == clean_x.shape and 0 < int(mask.sum()) < len(mask)
    assert torch.equal(x[~mask], clean_x[~mask]) and not torch.equal(x[mask], clean_x[mask])
    assert bool((y[mask] == model.attack.target).all()) and torch.equal(y[~mask], clean_y[~mask])


def test_the_rgb32_view_poisons_first_then_resizes():
    model = lab.backdoored("digits", "wrn16_1", "badnets", 0, epochs=1, view="rgb32")
    x, _, mask = model.poisoned
    assert x.shape[1:] == (3, 32, 32) and model.data.clean[0].shape[1:] == (3, 32, 32)
    raw = lab.lab_data("digits").train[0]
    expected = model.view(model.attack.poison(raw, lab.lab_data("digits").train[1],
                                              rate=lab.POISON_RATE, seed=0)[0])
    assert torch.equal(x, expected)


def test_source_hash_follows_the_files(tmp_path):
    one = tmp_path / "one.py"
    one.write_text("a = 1\n")
    before = lab.source_hash([one])
    assert lab.source_hash([one]) == before and len(before) == 16
    one.write_text("a = 2\n")
    assert lab.source_hash([one]) != before
    # A folder is every source file under it, names included.
    folder = lab.source_hash([tmp_path])
    one.rename(tmp_path / "two.py")
    assert lab.source_hash([tmp_path]) != folder
    assert len(lab.code_version()) == 16


@pytest.mark.parametrize("call, message", [
    (lambda: lab.backdoored("cifar", "digits_cnn", "badnets", 0), "unknown lab data set"),
    (lambda: lab.backdoored("digits", "resnet50", "badnets", 0), "unknown lab architecture"),
    (lambda: lab.backdoored("digits", "digits_cnn", "badnets", 0, view="rgb64"),
     "unknown view"),
])
def test_bad_names_say_what_exists(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.skipif(not os.path.isfile(os.path.join(FASHION_MNIST_ROOT,
                                                    "train-images-idx3-ubyte.gz")),
                    reason="needs Debian's dataset-fashion-mnist (make venv installs it)")
def test_the_28x28_fashion_set_keeps_the_images_whole_and_the_splits_disjoint():
    splits = lab.lab_data("fmnist28")
    sizes = [len(split[0]) for split in (splits.train, splits.clean, splits.test)]
    assert sizes == [5000, 500, 2000] and splits.size == 28
    assert all(split[0].shape[1:] == (1, 28, 28) for split in (splits.train, splits.clean,
                                                              splits.test))
    assert torch.bincount(splits.clean[1], minlength=10).tolist() == [50] * 10
    seen = {x.numpy().tobytes() for x in splits.train[0]}
    assert not any(x.numpy().tobytes() in seen for x in splits.clean[0])


def test_the_lab_vit_is_built_for_the_data_sets_image_size():
    model = lab.build_model("vit_lab", 10, 1, image_size=28)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert model.pos_embedding.shape == (1, 7 * 7 + 1, 64)
