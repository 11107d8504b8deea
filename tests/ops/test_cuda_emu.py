"""The CPU execution layer that runs the CUDA kernels in the tests (tests/support/cuda_emu): CUDA's
execution model where bdfast's kernels rely on it, checked with small probe kernels, and its
16-bit conversions against CUDA's own."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from support import emulated_cuda

emulated_cuda.load()
probe = torch.ops.bdfast_emu

CUDA_SUCCESS, CUDA_INVALID_VALUE, CUDA_INVALID_CONFIGURATION = 0, 1, 9


def test_half_and_bfloat16_conversions_are_cudas():
    # Every half and bfloat16 value, and float32 values around every rounding boundary, against
    # the toolkit's own host implementation of the conversions (built where the toolkit is).
    mismatches = probe.conversion_mismatches()
    if mismatches == -1:
        pytest.skip("CUDA's cuda_fp16.h was not found when the emulation was built")
    assert mismatches == 0


def test_half_and_bfloat16_conversions_round_like_torch():
    # Independent of the toolkit: torch's CPU conversions also round to nearest even. The
    # emulated gaussian_kl reads 16-bit inputs through the emulation's conversions.
    x = torch.tensor([1 + 2 ** -11, 1 + 3 * 2 ** -11, 65519.0, 65520.0, 2 ** -25, 2 ** -24 * 1.5,
                      6e-8, -7.3e-6, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 3.4e38, float("inf")])
    for dtype in (torch.float16, torch.bfloat16):
        ones = torch.ones_like(x)
        with emulated_cuda.active():
            # KL(N(0, 1) || N(0, v)) with v rounded by the kernel: 0.5 (ln v + 1 / v - 1).
            emulated = torch.ops.bdfast.gaussian_kl(ones * 0, ones, ones * 0,
                                                    x.abs().to(dtype), 0.0)
        expected = torch.ops.bdfast.gaussian_kl(ones * 0, ones, ones * 0, x.abs().to(dtype), 0.0)
        assert torch.equal(emulated.isnan(), expected.isnan())
        torch.testing.assert_close(emulated, expected, rtol=1e-6, atol=0, equal_nan=True)


def test_returned_threads_leave_barriers_and_shuffles():
    out = probe.probe_early_exit()
    assert out[:32].tolist() == [sum(range(1, 33))] * 32
    assert out[32:].tolist() == [6] * 32


def test_a_shuffle_waits_for_its_warp_only():
    out = probe.probe_warp_local_shuffle()
    assert out[:32].tolist() == [sum(range(32))] * 32
    assert out[32:].tolist() == list(range(32, 256))


def test_shuffle_widths():
    out = probe.probe_width().tolist()
    lanes = range(32)
    assert out[:32] == [10 * (i ^ 1) for i in lanes]
    assert out[32:64] == [10 * ((i & ~7) + 3) for i in lanes]
    assert out[64:] == [10 * (i ^ 8) if (i ^ 8) <= (i | 7) else 10 * i for i in lanes]


@pytest.mark.parametrize("odd_one", [-1, 0, 255])
def test_syncthreads_and(odd_one):
    assert probe.probe_syncthreads_and(odd_one).tolist() == [int(odd_one == -1)] * 4


def test_shared_memory_is_per_block():
    assert probe.probe_static_shared(24).tolist() == list(range(24))
    assert probe.probe_dynamic_shared(12).tolist() == [1] * 12


def test_the_emulated_sources_declare_no_thread_local_of_their_own():
    # The runtime takes every thread-local object of the library outside its own namespace for
    # a __shared__ variable and refills it at every block (runtime.cpp), so a thread_local
    # anywhere else in what the library is built from would be overwritten.
    root = pathlib.Path(__file__).resolve().parents[2]
    sources = [path for d in ("csrc", "csrc/cuda", "tests/support/cuda_emu")
               for path in (root / d).iterdir()
               if path.suffix in (".cu", ".cuh", ".cpp", ".h") and path.stem != "runtime"]
    declaring = [path for path in sources if re.search(r"\bthread_local\b", path.read_text())]
    assert len(sources) > 10 and declaring == []


def test_static_shared_memory_is_refilled_at_every_block():
    # Each block reads a __shared__ float before writing its index there. On a GPU it would find
    # what an earlier block on the SM left; here 24 blocks share 3 workers, so without the fill
    # most would read an earlier block's index instead of 0xff bytes.
    out = probe.probe_stale_shared(24)
    assert out.view(torch.int32).tolist() == [-1] * 24


def test_several_blocks_run_at_once():
    # The "last block to arrive merges" paths need concurrent arrivals.
    assert probe.probe_concurrency(6) >= 2


@pytest.mark.parametrize("blocks, threads, shared, error", [
    (0, 32, 0, CUDA_INVALID_CONFIGURATION),
    (1, 0, 0, CUDA_INVALID_CONFIGURATION),
    (1, 1025, 0, CUDA_INVALID_CONFIGURATION),
    (1, 32, 48 * 1024 + 4, CUDA_INVALID_VALUE),
])
def test_bad_launch_configurations_fail_as_on_a_gpu(blocks, threads, shared, error):
    assert probe.probe_launch_error(blocks, threads, shared) == error


def run_probe_in_subprocess(call: str) -> subprocess.CompletedProcess:
    """Runs ``torch.ops.bdfast_emu.<call>`` in a new process, which a device fault ends."""
    code = (f"from support import emulated_cuda; import torch; emulated_cuda.load(); "
            f"torch.ops.bdfast_emu.{call}")
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_deadlock_stops_the_process_with_a_message():
    run = run_probe_in_subprocess("probe_deadlock()")
    assert run.returncode != 0
    assert "bdfast CUDA emulation: deadlock in block 0" in run.stderr
    assert "thread 0: __syncthreads" in run.stderr and "a warp shuffle" in run.stderr


def test_threads_at_different_barriers_stop_the_process_with_a_message():
    # Half the block waits at one __syncthreads and half at another: a GPU would let both go on.
    run = run_probe_in_subprocess("probe_divergent_barrier(128)")
    assert run.returncode != 0
    assert "bdfast CUDA emulation: divergent __syncthreads in block 0" in run.stderr
    sites = re.findall(r"probes\.cpp:(\d+):\d+", run.stderr)
    assert len(sites) == 2 and sites[0] != sites[1], run.stderr


@pytest.mark.parametrize("split", [0, 256])
def test_threads_at_one_barrier_go_on(split):
    # The same kernel with every thread in one branch.
    assert probe.probe_divergent_barrier(split).tolist() == [1 if split else 2] * 256
