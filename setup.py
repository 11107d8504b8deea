"""Builds the ``bdfast._C`` extension: CPU kernels always, CUDA kernels when possible.

CUDA kernels are compiled when the installed torch is a CUDA build and nvcc is found
(``CUDA_HOME``, ``/usr/local/cuda`` or ``nvcc`` on PATH). ``BDFAST_NO_CUDA=1`` skips them.
``TORCH_CUDA_ARCH_LIST`` picks the architectures. Without it, the kernels are built for sm_80
and sm_90 plus PTX (A100, H100 and newer), so that a build on a machine without a GPU does not
compile for every architecture, and also for every GPU visible at build time (a T4 or V100 needs
its own sm_75 / sm_70 code: PTX only runs on newer GPUs). The list is compiled into the
extension, so that at run time a GPU it does not cover falls back to the reference ops.
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
DEFAULT_CUDA_ARCHS = ("8.0", "9.0+PTX")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_arch_list(requested, visible):
    """The TORCH_CUDA_ARCH_LIST to build with.

    ``requested`` is the user's TORCH_CUDA_ARCH_LIST (None or "" when unset), which wins;
    otherwise the defaults plus the compute capabilities in ``visible`` (a list of
    (major, minor) of the GPUs seen at build time), in ascending order.
    """
    if requested:
        return requested
    archs = {float(a.replace("+PTX", "")): a for a in DEFAULT_CUDA_ARCHS}
    for major, minor in visible:
        archs.setdefault(float(f"{major}.{minor}"), f"{major}.{minor}")
    return ";".join(archs[key] for key in sorted(archs))


def _visible_capabilities():
    """(major, minor) of every GPU torch sees now; none without a driver or a GPU."""
    try:
        return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    except (RuntimeError, AssertionError):
        return []


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
    archs = cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"), _visible_capabilities())
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # what torch's BuildExtension compiles for
    print(f"bdfast: building CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST={archs}.",
          file=sys.stderr)
    # The list reaches bdfast._C.cuda_arch_list() through the C++ compiler: "_" joins the
    # entries, as ";" and spaces would not survive the build's shell command lines.
    arch_macro = "_".join(archs.replace(";", " ").split())
    cxx_flags.append(f"-DBDFAST_CUDA_ARCHS={arch_macro}")
    return CUDAExtension("bdfast._C", sources, include_dirs=include_dirs,
                         define_macros=[("WITH_CUDA", None)],
                         extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
                         extra_link_args=link_flags)


# setuptools runs this file as __main__ (also through pip); the tests import it for
# cuda_arch_list without building anything.
if __name__ == "__main__":
    setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
