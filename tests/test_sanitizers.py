"""The CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer: the
CMake build with LAYERNORM_EXT_SANITIZE=ON runs the C++ dispatcher test, and
any report aborts it. CPU kernels only (LAYERNORM_EXT_CUDA=OFF, also with a
CUDA torch): the test runs no CUDA kernel, and building them would double the
build time."""

import os
import subprocess

import pytest
import torch

from test_cmake import ROOT, run


@pytest.mark.slow
def test_kernels_run_clean_under_asan_and_ubsan(tmp_path):
    build = tmp_path / "build"
    run(["cmake", "-S", ROOT, "-B", build, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
         "-DLAYERNORM_EXT_SANITIZE=ON", "-DLAYERNORM_EXT_CUDA=OFF", "-DCMAKE_BUILD_TYPE=RelWithDebInfo"],
        cwd=tmp_path)
    run(["cmake", "--build", build, "-j2"], cwd=tmp_path, timeout=1800)
    linked = subprocess.run(["ldd", build / "test_dispatcher"], capture_output=True, text=True).stdout
    assert "libasan" in linked and "libubsan" in linked, linked
    # Leak detection is off: torch's own static objects live until exit.
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:halt_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    result = subprocess.run([build / "test_dispatcher"], cwd=build, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    assert "ERROR: AddressSanitizer" not in result.stderr and "runtime error" not in result.stderr
