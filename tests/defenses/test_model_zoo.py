"""Every defense, once, on torchvision's and timm's architectures (random weights, small inputs,
one epoch on one batch of two images): MEDIC's statistics have each hooked layer's feature
count, BCU's adaptive ratios reach every layer, and DDE / MBNS run on the nets with BatchNorm
and refuse, in one sentence, those without."""
from __future__ import annotations

import copy
from typing import Callable, Dict

import pytest
import torch
from torch import nn

import bdfast
import bdfast.defenses.medic
from bdfast.defenses.bcu import bcu_ratios

tvm = pytest.importorskip("torchvision.models")

NUM_CLASSES = 10


def _small_maxvit() -> nn.Module:
    """maxvit_t's building blocks (MBConv, block and grid attention), two narrow stages: its
    partition size 7 needs a 224x224 input, size 2 fits a 32x32 one."""
    return tvm.MaxVit(input_size=(32, 32), stem_channels=16, partition_size=2,
                      block_channels=[16, 32], block_layers=[1, 1], head_dim=8,
                      stochastic_depth_prob=0.0, num_classes=NUM_CLASSES)


TORCHVISION: Dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: tvm.resnet18(num_classes=NUM_CLASSES),
    "mobilenet_v3_small": lambda: tvm.mobilenet_v3_small(num_classes=NUM_CLASSES),
    "efficientnet_b0": lambda: tvm.efficientnet_b0(num_classes=NUM_CLASSES),
    "convnext_tiny": lambda: tvm.convnext_tiny(num_classes=NUM_CLASSES),
    "swin_t": lambda: tvm.swin_t(num_classes=NUM_CLASSES),
    "maxvit (small)": _small_maxvit,
    "vit (small)": lambda: tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                 num_heads=2, hidden_dim=32, mlp_dim=64,
                                                 num_classes=NUM_CLASSES),
}

TIMM = {
    "vit_tiny_patch16_224": dict(img_size=32),
    "deit_tiny_patch16_224": dict(img_size=32),
    "convnext_atto": {},
    # Its window attention's outputs are [B * windows, tokens, C]: layers="auto" leaves them out.
    "swin_tiny_patch4_window7_224": dict(img_size=32, window_size=4),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one thread: on a shared 2-core machine under load, this file took 383 s (168 s of
    CPU) with torch's two OpenMP threads and 27 s (18 s of CPU) with one. Only that every
    defense runs matters here, not its numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loader():
    """One batch of two 32x32 images and labels: each defense's passes run once."""
    generator = torch.Generator().manual_seed(0)
    return [(torch.rand(2, 3, 32, 32, generator=generator),
             torch.randint(0, NUM_CLASSES, (2,), generator=generator))]


def _declared_features(module: nn.Module):
    """The feature count a module says it makes, or None (activations, blocks, ...)."""
    for attribute in ("out_channels", "out_features", "num_features", "num_channels",
                      "normalized_shape", "embed_dim"):
        count = getattr(module, attribute, None)
        if isinstance(count, int):
            return count
        if isinstance(count, (tuple, list)) and count:
            return int(count[0])
    return None


def _feature_counts(model: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """``{name: features}`` of every module that runs on ``x``: its declared count, else the
    count of the last declaring module that finished before it (an activation's input)."""
    counts: Dict[str, int] = {}
    last = [None]

    def hook(name):
        def record(module, inputs, output):
            declared = _declared_features(module)
            last[0] = declared if declared is not None else last[0]
            if last[0] is not None:
                counts.setdefault(name, last[0])
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def _run_every_defense(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model.eval()
    loader = _loader()
    before = copy.deepcopy(model.state_dict())

    # MEDIC, with its defaults: the statistics of each hooked layer have its feature count.
    seen = {}
    statistics = bdfast.defenses.medic.teacher_statistics

    def spy(net, names, *args, **kwargs):
        mu, sigma = statistics(net, names, *args, **kwargs)
        seen.update(names=list(names), mu=mu, sigma=sigma)
        return mu, sigma

    monkeypatch.setattr(bdfast.defenses.medic, "teacher_statistics", spy)
    cloned = bdfast.medic_clone(model, loader, epochs=1, progress=False)
    with torch.no_grad():
        assert cloned(loader[0][0]).shape == (2, NUM_CLASSES)
    counts = _feature_counts(copy.deepcopy(model), loader[0][0])
    assert seen["names"]
    for name, mu, sigma in zip(seen["names"], seen["mu"], seen["sigma"]):
        assert name in counts, f"{name} is hooked but does not run"
        assert mu.shape == sigma.shape == (counts[name],), name

    # BCU: every re-initialisable layer gets a share, and the run gives a classifier.
    ratios = bcu_ratios(copy.deepcopy(model), loader[0][0])
    assert min(ratios.values()) > 0, [name for name, p in ratios.items() if p == 0]
    student = bdfast.bcu_cleanse(model, loader, epochs=1, progress=False)
    with torch.no_grad():
        assert student(loader[0][0]).shape == (2, NUM_CLASSES)

    # DDE and MBNS prune BatchNorm channels, and refuse a net without.
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        for prune in (bdfast.dde_prune, bdfast.mbns_prune):
            pruned = prune(model, loader, progress=False)
            with torch.no_grad():
                assert pruned.model(loader[0][0]).shape == (2, NUM_CLASSES)
    else:
        for prune in (bdfast.dde_prune, bdfast.mbns_prune):
            with pytest.raises(ValueError, match=r"^[^\n]*has no BatchNorm layer[^\n]*$"):
                prune(model, loader, progress=False)

    for key, value in model.state_dict().items():  # no defense changed the model
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_model(name, monkeypatch):
    _run_every_defense(TORCHVISION[name](), monkeypatch)


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_model(name, monkeypatch):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **TIMM[name])
    _run_every_defense(model, monkeypatch)


def test_the_backdoorbench_models_said_to_be_verified_are_in_this_zoo():
    from bdfast.interop import backdoorbench

    verified = set(backdoorbench.ZOO_TESTED)
    assert verified and verified <= set(backdoorbench.TORCHVISION_MODELS) & set(TORCHVISION)
