"""Wherever the CUDA kernels can be built, the extension has one for every op (no GPU needed).

setup.py compiles csrc/cuda/ when the installed torch is a CUDA build, nvcc is found
(``CUDA_HOME``, ``/usr/local/cuda`` or ``PATH``) and ``BDFAST_NO_CUDA`` is not set. Where those
hold, a build that skipped the kernels, or a kernel that failed to register, fails here, on
CI's GPU-less machines as much as on a GPU.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import bdfast
from bdfast.ops import _extension


def _why_cuda_cannot_be_built():
    """The reason setup.py would skip the CUDA kernels here, or None (the same rules)."""
    if os.environ.get("BDFAST_NO_CUDA", "0") not in ("", "0"):
        return "BDFAST_NO_CUDA is set"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    home = os.environ.get("CUDA_HOME")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    if not home and shutil.which("nvcc"):
        home = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))
    if not home or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return "nvcc was not found"
    return None


@pytest.mark.skipif(not _extension.loaded(), reason="the compiled extension is not loaded")
def test_every_op_has_a_cuda_kernel_where_cuda_can_be_built():
    why = _why_cuda_cannot_be_built()
    if why is not None:
        pytest.skip(f"the CUDA kernels are not built here: {why}")
    missing = [op for op in _extension.OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"bdfast::{op}", "CUDA")]
    assert not missing, (f"torch {torch.__version__} has CUDA {torch.version.cuda} and nvcc is "
                         f"present, but bdfast._C has no CUDA kernel for {missing}; "
                         f"{_extension.REBUILD_HINT}")
    assert bdfast.backend_info()["native_cuda"]


def _load_setup_py():
    """setup.py as a module, without building (it only calls setup() as __main__)."""
    import importlib.util
    from unittest import mock
    path = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "setup.py")
    spec = importlib.util.spec_from_file_location("bdfast_setup_under_test", path)
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(os.environ):  # setup.py sets CUDA_HOME for torch's build tools
        spec.loader.exec_module(module)
    return module


def test_setup_builds_for_the_visible_gpus_plus_the_defaults():
    setup_py = _load_setup_py()
    assert setup_py.cuda_arch_list(None, []) == "8.0;9.0+PTX"
    assert setup_py.cuda_arch_list("", [(7, 5)]) == "7.5;8.0;9.0+PTX"  # a T4 (Colab)
    assert setup_py.cuda_arch_list(None, [(7, 0), (8, 6)]) == "7.0;8.0;8.6;9.0+PTX"
    assert setup_py.cuda_arch_list(None, [(9, 0), (8, 0)]) == "8.0;9.0+PTX"
    assert setup_py.cuda_arch_list(None, [(12, 0)]) == "8.0;9.0+PTX;12.0"
    # The user's own list wins.
    assert setup_py.cuda_arch_list("7.5", [(9, 0)]) == "7.5"


@pytest.mark.parametrize("capability,archs,expected", [
    ((7, 5), ["8.0", "9.0+PTX"], False),        # T4: PTX never runs on an older GPU
    ((7, 0), ["8.0", "9.0+PTX"], False),        # V100
    ((8, 0), ["8.0", "9.0+PTX"], True),
    ((8, 6), ["8.0", "9.0+PTX"], True),         # sm_80 code runs on sm_86
    ((9, 0), ["8.0", "9.0+PTX"], True),
    ((12, 0), ["8.0", "9.0+PTX"], True),        # through the PTX
    ((12, 0), ["8.0", "9.0"], False),
    ((7, 5), ["7.5", "8.0", "9.0+PTX"], True),
    ((8, 0), ["8.6"], False),                   # sm_86 code does not run on sm_80
    ((8, 0), ["Ampere"], None),                 # a name: cannot be told
])
def test_kernel_image_rule(capability, archs, expected):
    assert _extension.has_kernel_image(capability, archs) is expected


@pytest.fixture
def t4_without_its_kernels(monkeypatch):
    """A visible T4 and CUDA kernels built for the default architectures only."""
    monkeypatch.setattr(_extension, "has_kernel", lambda op, device_type: True)
    monkeypatch.setattr(_extension, "cuda_arch_list", lambda: ["8.0", "9.0+PTX"])
    monkeypatch.setattr(_extension, "_no_image_warned", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")


def test_auto_falls_back_to_the_reference_with_one_warning_on_an_uncovered_gpu(
        t4_without_its_kernels):
    from bdfast.ops._dispatch import use_native
    device = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match="compute capability 7.5") as record:
        assert use_native("gaussian_kl", "auto", device) is False
        assert use_native("medic_clone_loss", "auto", device) is False
    assert len(record) == 1
    with pytest.raises(RuntimeError, match="backend='native'.*7.5.*TORCH_CUDA_ARCH_LIST"):
        use_native("gaussian_kl", "native", device)


def test_backend_info_says_why_the_gpu_is_not_used(t4_without_its_kernels):
    info = bdfast.backend_info()
    assert info["cuda_archs"] == ["8.0", "9.0+PTX"]
    assert "Tesla T4" in info["why"]["cuda_kernel_image"]
    assert "7.5" in info["why"]["cuda_kernel_image"]


def test_an_extension_without_the_recorded_list_is_not_an_error(monkeypatch):
    # An extension built before the architecture list was recorded (an old editable build).
    monkeypatch.setattr(_extension, "_C", object())
    assert _extension.cuda_arch_list() is None
    assert _extension.cuda_image_problem(torch.device("cuda", 0)) is None
