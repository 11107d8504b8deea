"""Builds the ``bdfast._C`` extension: CPU kernels always, CUDA kernels when possible.

CUDA kernels are compiled when the installed torch is a CUDA build and nvcc is found
(``CUDA_HOME``, ``/usr/local/cuda`` or ``nvcc`` on PATH). ``BDFAST_NO_CUDA=1`` skips them.
``TORCH_CUDA_ARCH_LIST`` picks the architectures; the default is sm_80 and sm_90 plus PTX, so
that a build on a machine without a GPU does not compile for every architecture.
"""
import glob
import os
import shutil
import sys

from setuptools import setup


def _find_cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported.
_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ.setdefault("CUDA_HOME", _cuda_home)
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _why_no_cuda():
    if os.environ.get("BDFAST_NO_CUDA", "0") not in ("", "0"):
        return "BDFAST_NO_CUDA is set"
    if torch.version.cuda is None:
        return f"the installed torch {torch.__version__} is a CPU-only build"
    if not _cuda_home or not os.path.exists(os.path.join(_cuda_home, "bin", "nvcc")):
        return "nvcc was not found (set CUDA_HOME)"
    return None


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    # -fopenmp makes at::parallel_for (inlined from ATen's headers) run on torch's OpenMP
    # threads; without it every kernel runs on one thread. The libgomp it links is the one
    # torch has already loaded.
    cxx_flags = ["-O3", "-fno-trapping-math"]
    link_flags = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    else:
        cxx_flags.append("-fopenmp-simd")
    why = _why_no_cuda()
    if why is not None:
        print(f"bdfast: building the CPU kernels only, because {why}.", file=sys.stderr)
        return CppExtension("bdfast._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    # torch's CUDA headers include cuBLAS/cuSPARSE headers that ship in the pip wheels.
    for site in sys.path:
        wheel_include = os.path.join(site, "nvidia", "cu13", "include")
        if os.path.isdir(wheel_include):
            include_dirs.append(wheel_include)
            break
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    print(f"bdfast: building CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST="
          f"{os.environ['TORCH_CUDA_ARCH_LIST']}.", file=sys.stderr)
    return CUDAExtension("bdfast._C", sources, include_dirs=include_dirs,
                         define_macros=[("WITH_CUDA", None)],
                         extra_compile_args={"cxx": cxx_flags,
                                             "nvcc": ["-O3", "-lineinfo"]},
                         extra_link_args=link_flags)


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
