"""The C++/CUDA sources of the extension and the flags they build with.

Shared by setup.py (the prebuilt ``_C``), the JIT loader and CMakeLists.txt's
source list, so that every build compiles the same files. Imports nothing
from torch: setup.py loads this file before torch's build helpers.
"""

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent

# Flags for the C++ sources: optimize, and OpenMP so that at::parallel_for runs
# on torch's OpenMP pool (the extension links the libgomp torch has loaded).
CXX_FLAGS = ["-O3", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-lineinfo"]


def source_root() -> Path:
    """The csrc/ folder: inside the installed package, else the repository's."""
    for candidate in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    raise FileNotFoundError(
        f"layernorm_ext: no C++ sources found next to {_PACKAGE_DIR} (looked for csrc/ops.cpp "
        "in the package and in its parent folder)"
    )


# The pybind11 module's sources (the extension module and its eager entry
# points): Python builds only; CMakeLists.txt's C++ library leaves them out.
PYTHON_MODULE_SOURCES = ("module.cpp", "eager_calls.cpp")


def cpu_sources(root: Path) -> list[Path]:
    """Every source of a CPU-only build: schemas, checks, module, CPU kernels."""
    return sorted(root.glob("*.cpp")) + sorted((root / "cpu").glob("*.cpp"))


def cuda_sources(root: Path) -> list[Path]:
    """The sources a CUDA build adds: device kernels (.cu) and their host glue."""
    return sorted((root / "cuda").glob("*.cu")) + sorted((root / "cuda").glob("*.cpp"))
