"""Fixtures of the benchmark suite: devices, synchronisation, copy bandwidth, machine info."""
from __future__ import annotations

import os
import platform
import time
from functools import lru_cache

import pytest
import torch

import bdfast
from bdfast import lab

# The code version the timed kernels were loaded from, taken when the suite starts: the JSON's
# commit_info is read at the end, after any edit made to the working tree during the run.
CODE_VERSION = lab.code_version()


def pytest_configure(config):
    """``BDFAST_BENCH_THREADS=n`` pins torch's intra-op threads, e.g. on a shared machine."""
    threads = os.environ.get("BDFAST_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a timed function measures its own work on a GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.fixture
def sync(device):
    """``sync()`` waits for the device's queued kernels (a no-op on the CPU)."""
    return lambda: synchronize(device)


@pytest.fixture
def copy_bandwidth(device) -> float:
    """The device's measured copy bandwidth in bytes/s (see :func:`measure_copy_bandwidth`)."""
    return measure_copy_bandwidth(device.type)


@lru_cache(maxsize=None)
def measure_copy_bandwidth(device_type: str, nbytes: int = 1 << 28) -> float:
    """Measured copy bandwidth in bytes/s (bytes read + written) of one large tensor copy.

    This is the ceiling a memory-bound kernel can reach on the device; the medic benchmark
    reports its own achieved bandwidth as a share of it.
    """
    device = torch.device(device_type)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what the numbers depend on next to them in the JSON."""
    info = bdfast.backend_info()
    machine_info["cpu_model"] = _cpu_model()
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["bdfast_native_cpu"] = info["native_cpu"]
    machine_info["bdfast_native_cuda"] = info["native_cuda"]
    machine_info["bdfast_cpu_isa"] = info["cpu_isa"]
    machine_info["bdfast_code_version"] = CODE_VERSION
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name(0)
