"""bdfast.lab.data: the embedded digits split, Fashion-MNIST and the optional vision loaders."""
from __future__ import annotations

import os
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bdfast.lab import data


def _keys(x: torch.Tensor) -> list:
    """One hashable key per 8x8 digit image, from the integers 0..16 sklearn ships."""
    ints = torch.round(x * 16).to(torch.uint8).flatten(1).numpy()
    return [row.tobytes() for row in ints]


def test_splits_shapes_dtypes_ranges(digits):
    for x, y in (digits.train, digits.clean, digits.test):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 16, 16) and y.shape == (len(x),)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert set(y.tolist()) == set(range(10))
    assert digits.num_classes == 10 and digits.size == 16


def test_split_sizes_and_partition_of_the_real_data():
    from sklearn.datasets import load_digits as sk_load

    d = data.load_digits(size=8)
    sizes = [len(s[1]) for s in (d.train, d.clean, d.test)]
    assert sum(sizes) == 1797
    assert abs(sizes[1] / 1797 - 0.15) < 0.01
    assert abs(sizes[2] / 1797 - 0.25) < 0.01
    # At size 8 no resampling happens, so the three splits together are exactly sklearn's images
    # (as a multiset: nothing lost, nothing duplicated across splits), with matching labels.
    xs = torch.cat([d.train[0], d.clean[0], d.test[0]])
    ys = torch.cat([d.train[1], d.clean[1], d.test[1]])
    bunch = sk_load()
    expected = Counter(zip(_keys(torch.from_numpy(bunch.images / 16.0)), bunch.target.tolist()))
    assert Counter(zip(_keys(xs), ys.tolist())) == expected


def test_split_is_stratified(digits):
    all_counts = np.bincount(np.concatenate([s[1].numpy() for s in
                                             (digits.train, digits.clean, digits.test)]))
    for _, y in (digits.train, digits.clean, digits.test):
        counts = np.bincount(y.numpy(), minlength=10)
        expected = all_counts * len(y) / all_counts.sum()
        assert np.all(np.abs(counts - expected) <= 1.5), (counts, expected)


def test_split_is_seeded():
    a, b, c = data.load_digits(seed=0), data.load_digits(seed=0), data.load_digits(seed=1)
    for split in ("train", "clean", "test"):
        assert torch.equal(getattr(a, split)[0], getattr(b, split)[0])
        assert torch.equal(getattr(a, split)[1], getattr(b, split)[1])
    assert not torch.equal(a.test[1], c.test[1])


def test_upsampling_is_bilinear_from_the_8x8_images():
    small, big = data.load_digits(size=8), data.load_digits(size=32)
    assert big.train[0].shape[1:] == (1, 32, 32)
    ref = F.interpolate(small.clean[0], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(big.clean[0], ref.clamp(0, 1))
    assert torch.equal(big.clean[1], small.clean[1])


@pytest.mark.parametrize("size", [4, 7, 16.0, "16", True])
def test_load_digits_rejects_bad_size(size):
    with pytest.raises(ValueError, match="size"):
        data.load_digits(size=size)


@pytest.mark.parametrize("call", [lambda: data.cifar10("/nonexistent"),
                                  lambda: data.gtsrb("/nonexistent"),
                                  lambda: data.image_folder("/nonexistent")])
def test_vision_loaders_say_how_to_install_torchvision(monkeypatch, call):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(ImportError, match=r"pip install bdfast\[vision\]"):
        call()


def test_vision_loaders_never_download(tmp_path):
    pytest.importorskip("torchvision")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        data.cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        data.gtsrb(tmp_path)
    assert not any(tmp_path.iterdir())


# --- Fashion-MNIST ----------------------------------------------------------------------------

def _write_idx(path, array: np.ndarray) -> None:
    import gzip
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion(tmp_path):
    """Four IDX files in the standard layout: 200 training and 50 test 28x28 images, where
    every image is filled with its own index (mod 256) and labels cycle through 10 classes."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 200), ("t10k", 50)):
        images = np.repeat((np.arange(n) % 256)[:, None, None], 28 * 28, axis=1).reshape(n, 28, 28)
        labels = rng.permutation(np.arange(n) % 10)
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return tmp_path


def test_fashion_mnist_reads_idx_files_and_splits_stratified(tiny_fashion):
    lab = data.load_fashion_mnist(tiny_fashion, clean_size=40, train_size=100, test_size=30)
    assert (lab.num_classes, lab.size) == (10, 28)
    assert [len(s[1]) for s in (lab.train, lab.clean, lab.test)] == [100, 40, 30]
    for (x, y), per_class in ((lab.train, 10), (lab.clean, 4), (lab.test, 3)):
        assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert Counter(y.tolist()) == {c: per_class for c in range(10)}
        index = torch.round(x[:, 0, 0, 0] * 255).long()
        assert torch.equal(x, (index.float() / 255)[:, None, None, None].expand_as(x))
        assert torch.equal(index, index.sort().values)  # the files' order is kept
    train_idx = set(torch.round(lab.train[0][:, 0, 0, 0] * 255).long().tolist())
    clean_idx = set(torch.round(lab.clean[0][:, 0, 0, 0] * 255).long().tolist())
    assert not train_idx & clean_idx  # the defender's clean images are not the attacker's
    again = data.load_fashion_mnist(tiny_fashion, clean_size=40, train_size=100, test_size=30)
    assert torch.equal(again.clean[0], lab.clean[0])
    other = data.load_fashion_mnist(tiny_fashion, clean_size=40, train_size=100, test_size=30,
                                    seed=1)
    assert not torch.equal(other.clean[0], lab.clean[0])
    whole = data.load_fashion_mnist(tiny_fashion, clean_size=40)
    assert [len(s[1]) for s in (whole.train, whole.clean, whole.test)] == [160, 40, 50]


def test_fashion_mnist_bad_input(tiny_fashion, tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="clean_size"):
        data.load_fashion_mnist(tiny_fashion, clean_size=200)
    with pytest.raises(ValueError, match="train_size"):
        data.load_fashion_mnist(tiny_fashion, clean_size=40, train_size=161)
    _write_idx(tiny_fashion / "t10k-labels-idx1-ubyte.gz", np.zeros(49))
    with pytest.raises(ValueError, match="do not pair up"):
        data.load_fashion_mnist(tiny_fashion, clean_size=40)


@pytest.mark.skipif(not os.path.isfile(os.path.join(data.FASHION_MNIST_ROOT,
                                                    "t10k-labels-idx1-ubyte.gz")),
                    reason="Fashion-MNIST is not installed: `make data` installs Debian's "
                           "dataset-fashion-mnist package where apt-get exists")
def test_fashion_mnist_installed_files():
    lab = data.load_fashion_mnist(test_size=1000)
    assert [len(s[1]) for s in (lab.train, lab.clean, lab.test)] == [57000, 3000, 1000]
    assert Counter(lab.test[1].tolist()) == {c: 100 for c in range(10)}
    # Real photographs of clothing: dark background, a full range of grey levels.
    assert float(lab.test[0].min()) == 0.0 and float(lab.test[0].max()) == 1.0
    assert 0.2 < float(lab.train[0][:2000].mean()) < 0.4
