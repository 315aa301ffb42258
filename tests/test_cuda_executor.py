"""The CPU executor's own checks (tests/cuda_emulator), on deliberately faulty
kernels: each bug class it promises to report is reported, the warp intrinsics
give what the CUDA programming guide defines, and launches fail as the CUDA
runtime's do."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cuda_emulator import build

pytestmark = pytest.mark.cuda_emulated

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_a_missing_barrier_gives_different_bits_under_the_two_schedules(cuda_executor):
    ascending, descending = cuda_executor.neighbour_exchange(False, 3, 64)
    assert not torch.equal(ascending.nan_to_num(-1), descending.nan_to_num(-1))


def test_with_the_barrier_both_schedules_agree_and_are_right(cuda_executor):
    ascending, descending = cuda_executor.neighbour_exchange(True, 3, 64)
    expected = ((torch.arange(64) + 1) % 64 + 1).float().repeat(3)
    assert torch.equal(ascending, expected) and torch.equal(descending, expected)


@pytest.mark.parametrize(
    "kernel, message",
    [
        ("early_return_before_barrier", "__syncthreads reached by 16 of 32 threads; thread (0, 0, 0) had returned"),
        ("shuffle_mask_names_absent_lane", "__shfl_xor_sync with mask 0xffffffff: lane 16 has returned"),
        ("shuffle_reads_outside_mask", "thread (15, 0, 0): __shfl_down_sync reads lane 16, which is not in the mask 0xffff"),
        ("calling_lane_outside_mask", "__shfl_sync with mask 0x1: the calling lane 1 is not in the mask"),
    ],
)
def test_undefined_synchronization_is_a_launch_failure(cuda_executor, kernel, message):
    error = cuda_executor.launch_faulty(kernel, 32)
    assert error.startswith("unspecified launch failure") and message in error, error


@pytest.mark.parametrize(
    "block_x, block_y, grid_y, shared_bytes, allow_shared, error",
    [
        (1024, 1, 1, 0, 0, ""),
        (1025, 1, 1, 0, 0, "invalid configuration argument"),
        (512, 4, 1, 0, 0, "invalid configuration argument"),
        (32, 1, 65536, 0, 0, "invalid configuration argument"),
        (32, 1, 65535, 0, 0, ""),
        (32, 1, 1, 48 << 10, 0, ""),
        # Past 48 KiB a kernel must opt in (cudaFuncSetAttribute), up to the device's limit.
        (32, 1, 1, 64 << 10, 0, "invalid argument"),
        (32, 1, 1, 64 << 10, 64 << 10, ""),
    ],
)
def test_launch_errors_are_the_runtimes(cuda_executor, block_x, block_y, grid_y, shared_bytes, allow_shared, error):
    assert cuda_executor.launch_with(block_x, block_y, grid_y, shared_bytes, allow_shared) == error


def _guide_shuffles(delta, width):
    """__shfl_sync / _up / _down / _xor of value = lane, as the CUDA programming guide defines them."""
    idx, up, down, xor = [], [], [], []
    for lane in range(32):
        segment = lane - lane % width
        idx.append(segment + delta % width)
        up.append(lane - delta if lane - delta >= segment else lane)
        down.append(lane + delta if lane + delta < segment + width else lane)
        xor.append(lane ^ delta if (lane ^ delta) < segment + width else lane)
    return idx, up, down, xor


@pytest.mark.parametrize("width", [1, 2, 8, 16, 32])
@pytest.mark.parametrize("delta", [0, 1, 3, 5, 16])
def test_warp_intrinsics_follow_the_programming_guide(cuda_executor, delta, width):
    ascending, descending = cuda_executor.warp_intrinsics(delta, width)
    assert torch.equal(ascending, descending)
    idx, up, down, xor = _guide_shuffles(delta, width)
    assert ascending[0].tolist() == idx
    assert ascending[1].tolist() == up
    assert ascending[2].tolist() == down
    assert ascending[3].tolist() == xor
    ballot = sum(1 << lane for lane in range(32) if lane % (delta + 1) == 0)
    assert ascending[4].tolist() == [ballot - (1 << 32) if ballot >= 1 << 31 else ballot] * 32
    assert ascending[5].tolist() == [int(delta < 32)] * 32
    assert ascending[6].tolist() == [int(delta == 0)] * 32


def _run_child(code, env=None):
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {TESTS!r})
        from cuda_emulator import build
        module = build.load()
        """
    ) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)


def test_reading_past_the_dynamic_shared_memory_is_reported(cuda_executor):
    child = _run_child("module.read_shared_past_size(1024)\nprint('no fault')")
    assert child.returncode != 0, child.stdout
    assert "no fault" not in child.stdout
    assert "a kernel accessed dynamic shared memory past the launch's size" in child.stderr, child.stderr[-2000:]


@pytest.mark.skipif(not build.asan_available(), reason="no AddressSanitizer runtime for this compiler")
def test_the_sanitizer_build_reports_a_read_past_a_tensor(cuda_executor):
    env = build.asan_environment()
    child = _run_child(
        """
        import torch
        module.read_global_past_end(torch.ones(5))
        print('no report')
        """,
        env=env,
    )
    assert child.returncode != 0, child.stdout
    assert "AddressSanitizer: heap-buffer-overflow" in child.stderr, child.stderr[-3000:]
    assert "global_read_past_end_kernel" in child.stderr


def test_a_build_killed_midway_does_not_block_the_next_load(cuda_executor):
    """torch's builder waits, forever, on the lock file a killed build leaves
    in the folder (a test's timeout killing a child mid-build); the next load
    removes it and goes on."""
    lock = build.build_directory(build._wants_sanitizer()) / "lock"
    lock.write_text("")
    child = _run_child("print('loaded')")
    assert child.returncode == 0, child.stderr[-2000:]
    assert "loaded" in child.stdout
    assert not lock.exists()
