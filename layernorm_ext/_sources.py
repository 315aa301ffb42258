"""The C++/CUDA sources of the extension and the flags they build with.

Shared by setup.py (the prebuilt ``_C``), the JIT loader and CMakeLists.txt's
source list, so that every build compiles the same files. Imports nothing
from torch: setup.py loads this file before torch's build helpers.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent

# Flags for the C++ sources: optimize, and OpenMP so that at::parallel_for runs
# on torch's OpenMP pool (the extension links the libgomp torch has loaded).
CXX_FLAGS = ["-O3", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-lineinfo"]

# The GPUs a CUDA build targets when TORCH_CUDA_ARCH_LIST is unset and no GPU is
# visible to ask (torch's builders fail on an empty list): sm_80 binaries (A100,
# and the 8.x GPUs after it), sm_90 (H100/H200) and compute_90 PTX, which the
# driver compiles for newer GPUs. CMakeLists.txt uses the same list.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def cuda_home() -> str | None:
    """The CUDA toolkit's root: CUDA_HOME or CUDA_PATH when set, else the TOP
    that nvcc (on PATH) reports, else None. torch guesses the parent of nvcc's
    folder, which is wrong when nvcc is a wrapper script (/usr/local/bin/nvcc
    running /usr/local/cuda-13.0/bin/nvcc)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    dryrun = subprocess.run(
        [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True, check=False
    )
    for line in (dryrun.stdout + dryrun.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return str(Path(line.removeprefix("#$ TOP=")).resolve())
    return str(Path(nvcc).resolve().parent.parent)


def configure_cuda_build(torch) -> bool:
    """Whether to build the CUDA kernels, and the environment torch's builders
    need for it. ``torch`` is the imported module (this file imports nothing
    from torch).

    CUDA kernels are built when torch is a CUDA build and a toolkit is found
    (``LAYERNORM_EXT_CUDA=0``/``1`` forces the choice). Then CUDA_HOME is set to
    the toolkit :func:`cuda_home` found, and, when TORCH_CUDA_ARCH_LIST is unset
    and no GPU is visible, TORCH_CUDA_ARCH_LIST to :data:`DEFAULT_CUDA_ARCH_LIST`;
    each choice is reported on stderr in one line.
    """
    forced = os.environ.get("LAYERNORM_EXT_CUDA")
    if forced == "0" or (forced != "1" and torch.version.cuda is None):
        return False
    home = cuda_home()
    if home is None:
        if forced == "1":
            raise SystemExit(
                "layernorm_ext: LAYERNORM_EXT_CUDA=1 but no CUDA toolkit was found: put nvcc on "
                "PATH or set CUDA_HOME to the toolkit's root (the folder with bin/nvcc)"
            )
        _report(
            f"torch {torch.__version__} is a CUDA build but no CUDA toolkit was found (no nvcc on "
            "PATH, CUDA_HOME unset): building the CPU kernels only; set CUDA_HOME to the "
            "toolkit's root (the folder with bin/nvcc) to build the CUDA kernels too"
        )
        return False
    os.environ["CUDA_HOME"] = home
    # torch.utils.cpp_extension reads CUDA_HOME once, when first imported; if it
    # already was, its guess (possibly a wrapper's folder) is replaced too.
    extension_builder = sys.modules.get("torch.utils.cpp_extension")
    if extension_builder is not None:
        extension_builder.CUDA_HOME = home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        _report(
            f"TORCH_CUDA_ARCH_LIST is unset and no GPU is visible: building the CUDA kernels "
            f"for {DEFAULT_CUDA_ARCH_LIST} (set TORCH_CUDA_ARCH_LIST to choose others)"
        )
    _report(f"building the CUDA kernels with the toolkit in {home}")
    return True


def _report(message: str) -> None:
    print(f"layernorm_ext: {message}", file=sys.stderr, flush=True)


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
