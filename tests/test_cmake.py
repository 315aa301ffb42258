"""The CMake build (CMakeLists.txt): configures and builds layernorm_ext_ops
against the installed torch, runs the C++ dispatcher test with ctest, and
checks that it compiles the same sources as setup.py (less the Python module)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from layernorm_ext import _sources

ROOT = Path(__file__).resolve().parent.parent


def run(command, cwd, timeout=600):
    result = subprocess.run(
        command, check=False, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} failed ({result.returncode}):\n"
        f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    )
    return result.stdout


@pytest.mark.slow
def test_cmake_build_and_ctest(tmp_path):
    assert shutil.which("cmake") and shutil.which("ctest"), "cmake and ctest must be installed"
    build = tmp_path / "build"
    run(
        [
            "cmake",
            "-S",
            ROOT,
            "-B",
            build,
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
        ],
        cwd=tmp_path,
    )

    compiled = {
        Path(entry["file"]).resolve()
        for entry in json.loads((build / "compile_commands.json").read_text())
    }
    root = ROOT / "csrc"
    python_module = {root / name for name in _sources.PYTHON_MODULE_SOURCES}
    expected = set(_sources.cpu_sources(root)) - python_module
    if torch.version.cuda is not None:
        # A CUDA torch turns LAYERNORM_EXT_CUDA on by default.
        expected |= set(_sources.cuda_sources(root))
    assert compiled == expected | {ROOT / "tests" / "cpp" / "test_dispatcher.cpp"}

    # With a CUDA torch this compiles the CUDA kernels too: 10 minutes and more on 2 cores.
    run(["cmake", "--build", build, "-j2"], cwd=tmp_path, timeout=1800)
    output = run(["ctest", "--output-on-failure"], cwd=build)
    assert "100% tests passed" in output, output
