"""The ops under ``torch.compile`` on the CPU: fake kernels, autograd registration, eager parity.

The registered ops themselves are compiled with ``fullgraph=True`` (the fake kernels must
describe every output); the ``bdfast.ops`` wrappers, which choose a backend in Python, are
compiled as users would, and must give the eager result. ``torch.library.opcheck`` checks
each schema, fake kernel and autograd registration against the real kernel.
"""
from __future__ import annotations

import pytest
import torch

import bdfast
from bdfast import ops

pytestmark = pytest.mark.skipif(not bdfast.backend_info()["native_cpu"],
                                reason="the compiled CPU kernels are not available")


def medic_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 8, 6, 6), (4, 10), (4, 3, 5, 7)]
    t = [torch.randn(s, generator=gen) for s in shapes]
    g = [0.1 * torch.randn(s, generator=gen) for s in shapes]
    s = [x + 0.3 * torch.randn(x.shape, generator=gen) for x in t]
    mu = [x.mean([0] + list(range(2, x.dim()))) for x in t]
    sigma = [x.std([0] + list(range(2, x.dim()))) for x in t]
    return t, s, g, mu, sigma


def loss_and_grads(fn, t, s, g, mu, sigma):
    s = [x.detach().clone().requires_grad_() for x in s]
    loss = fn(t, s, g, mu, sigma)
    loss.backward()
    return loss.detach(), [x.grad for x in s]


def assert_same(a, b):
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
        return
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.allclose(a, b, rtol=1e-6, atol=0, equal_nan=True), (a, b)


# Inductor only calls the ops as extern kernels here, so it generates no C++ to compile.
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_medic_forward_backward_compiled(compile_backend):
    inputs = medic_inputs()

    def raw(t, s, g, mu, sigma):
        return torch.ops.bdfast.medic_clone_loss(t, s, g, mu, sigma, 5.0, 1e-5, False)[0]

    eager = loss_and_grads(raw, *inputs)
    compiled = loss_and_grads(torch.compile(raw, backend=compile_backend, fullgraph=True),
                              *inputs)
    assert_same(compiled[0], eager[0])
    assert_same(compiled[1], eager[1])


def test_medic_wrapper_compiled():
    inputs = medic_inputs(1)

    def loss_fn(t, s, g, mu, sigma):
        return ops.medic_clone_loss(t, s, g, mu, sigma, tau=5.0, signed=True, backend="native")

    eager = loss_and_grads(loss_fn, *inputs)
    compiled = loss_and_grads(torch.compile(loss_fn, backend="aot_eager"), *inputs)
    assert_same(compiled[0], eager[0])
    assert_same(compiled[1], eager[1])


def test_small_ops_compiled_fullgraph():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 12, generator=gen)
    offsets = torch.tensor([0, 5, 12])
    stats = [torch.rand(12, generator=gen) + 0.1 for _ in range(4)]

    def raw(x, offsets, mu_p, var_p, mu_q, var_q):
        h_default = torch.ops.bdfast.histogram_entropy(x, offsets, 0.01, False)
        h_compat = torch.ops.bdfast.histogram_entropy(x, offsets, 0.01, True)
        kl = torch.ops.bdfast.gaussian_kl(mu_p, var_p, mu_q, var_q, 1e-5)
        return h_default, h_compat, kl, torch.ops.bdfast.layer_outliers(kl, offsets, 1.0, True)

    compiled = torch.compile(raw, backend="aot_eager", fullgraph=True)
    assert_same(compiled(x, offsets, *stats), raw(x, offsets, *stats))


def test_small_op_wrappers_compiled():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 12, generator=gen)
    offsets = torch.tensor([0, 5, 12])

    def pipeline(x, offsets):
        h = ops.histogram_entropy(x, offsets, reference_compat=True, backend="native")
        mean, var = x.mean(0), x.var(0)
        kl = ops.gaussian_kl(mean, var, torch.zeros_like(mean), torch.ones_like(var),
                             backend="native")
        mask = ops.layer_outliers(kl, offsets, u=1.0, direction="high", backend="native")
        low = ops.layer_outliers(kl, offsets, u=0.5, direction="low", return_thresholds=True,
                                 backend="native")
        return h, kl, mask, low

    assert_same(torch.compile(pipeline, backend="aot_eager")(x, offsets), pipeline(x, offsets))


def test_opcheck_every_op():
    t, s, g, mu, sigma = medic_inputs(4)
    s = [x.requires_grad_() for x in s]
    x = torch.randn(50, 10)
    offsets = torch.tensor([0, 4, 10])
    cases = [
        (torch.ops.bdfast.medic_clone_loss.default, (t, s, g, mu, sigma, 5.0, 1e-5, False)),
        (torch.ops.bdfast.histogram_entropy.default, (x, offsets, 0.01, True)),
        (torch.ops.bdfast.histogram_entropy.default, (x, offsets, 0.01, False)),
        (torch.ops.bdfast.gaussian_kl.default, (x[0], x[1].abs(), x[2], x[3].abs(), 1e-5)),
        (torch.ops.bdfast.layer_outliers.default, (x[0], offsets, 1.0, False)),
    ]
    with torch.no_grad():
        _, row_stats = torch.ops.bdfast.medic_clone_loss(t, s, g, mu, sigma, 5.0, 1e-5, False)
    cases.append((torch.ops.bdfast.medic_clone_loss_backward.default,
                  (torch.tensor(1.0), t, [v.detach() for v in s], g, mu, sigma, row_stats, 5.0,
                   1e-5, False)))
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


# Calls every kernel refuses (csrc/checks.h); the fake kernels must refuse them too, or a
# compiled graph would carry shapes the real op never returns.
def _medic_layer(batch=2, channels=3):
    return (torch.ones(batch, channels, 2, 2),) * 3 + (torch.ones(channels),) * 2


def _medic(*layers):
    t, s, g, mu, sigma = (list(part) for part in zip(*layers))
    return torch.ops.bdfast.medic_clone_loss(t, s, g, mu, sigma, 5.0, 1e-5, False)


def _medic_backward(row_stats):
    t, s, g, mu, sigma = (list(part) for part in zip(_medic_layer()))
    return torch.ops.bdfast.medic_clone_loss_backward(torch.ones(()), t, s, g, mu, sigma,
                                                      row_stats, 5.0, 1e-5, False)


REFUSED = {
    "gaussian_kl lengths 5 and 7": lambda: torch.ops.bdfast.gaussian_kl(
        torch.ones(5), torch.ones(7), torch.ones(5), torch.ones(5), 1e-5),
    "gaussian_kl 2-D": lambda: torch.ops.bdfast.gaussian_kl(*[torch.ones(2, 3)] * 4, 1e-5),
    "histogram_entropy 1-D x": lambda: torch.ops.bdfast.histogram_entropy(
        torch.ones(6), torch.tensor([0, 6]), 0.01, False),
    "histogram_entropy int32 offsets": lambda: torch.ops.bdfast.histogram_entropy(
        torch.randn(4, 6), torch.tensor([0, 6], dtype=torch.int32), 0.01, False),
    "layer_outliers 2-D scores": lambda: torch.ops.bdfast.layer_outliers(
        torch.ones(2, 3), torch.tensor([0, 6]), 3.0, False),
    "layer_outliers one offset": lambda: torch.ops.bdfast.layer_outliers(
        torch.ones(6), torch.tensor([0]), 3.0, False),
    "medic s of another shape": lambda: _medic(
        (torch.ones(2, 3, 2, 2), torch.ones(2, 3, 2, 3), torch.ones(2, 3, 2, 2), torch.ones(3),
         torch.ones(3))),
    "medic mu of another length": lambda: _medic(
        _medic_layer()[:3] + (torch.ones(4), torch.ones(3))),
    "medic lists of two lengths": lambda: torch.ops.bdfast.medic_clone_loss(
        *[[x] for x in _medic_layer()[:4]], [], 5.0, 1e-5, False),
    "medic backward row_stats of one row": lambda: _medic_backward(torch.ones(1, 4)),
}


@pytest.mark.parametrize("call", REFUSED.values(), ids=REFUSED.keys())
def test_fake_kernels_refuse_what_the_kernels_refuse(call):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with pytest.raises(RuntimeError):
        call()
    with FakeTensorMode(), pytest.raises(RuntimeError):
        call()
