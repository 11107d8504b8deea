"""bdfast.loaders.tensor_loader: in-memory tensors as batches, shuffled reproducibly."""
from __future__ import annotations

import pytest
import torch

from bdfast.loaders import tensor_loader


def test_tensor_loader_shuffles_reproducibly_and_covers_everything():
    x = torch.arange(10.0).view(10, 1)
    y = torch.arange(10)
    loader = tensor_loader(x, y, batch_size=4, shuffle=True, seed=3)
    assert len(loader) == 3
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    assert all(isinstance(b, tuple) and torch.equal(b[0].flatten().long(), b[1]) for b in batches)
    order = torch.cat([b[1] for b in batches])
    assert sorted(order.tolist()) == list(range(10))
    assert not torch.equal(order, y)  # shuffled
    again = torch.cat([b[1] for b in tensor_loader(x, y, batch_size=4, shuffle=True, seed=3)])
    other = torch.cat([b[1] for b in tensor_loader(x, y, batch_size=4, shuffle=True, seed=4)])
    assert torch.equal(order, again) and not torch.equal(order, other)


def test_tensor_loader_without_labels_yields_plain_tensors_in_order():
    x = torch.rand(5, 1, 2, 2)
    batches = list(tensor_loader(x, batch_size=2))
    assert all(isinstance(b, torch.Tensor) for b in batches)
    assert torch.equal(torch.cat(batches), x)


@pytest.mark.parametrize("args, kwargs, error", [
    ((torch.rand(3, 1), torch.arange(4)), {}, ValueError),
    ((torch.rand(3, 1), torch.arange(3)), {"batch_size": 0}, ValueError),
    (([1.0, 2.0],), {}, TypeError),
    ((torch.rand(0, 1),), {}, ValueError),
])
def test_tensor_loader_rejects_bad_input(args, kwargs, error):
    with pytest.raises(error):
        tensor_loader(*args, **kwargs)
