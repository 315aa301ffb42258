"""Builds and loads the CPU executor of the CUDA kernels (tests only).

The kernel sources (csrc/cuda/*.cu) and their torch glue (csrc/cuda/*_cuda.cpp)
compile with the host C++ compiler against ``cuda_emulator.h`` (force-included,
with LAYERNORM_EXT_CUDA_EMULATOR defined) into a torch extension whose ops are
``torch.ops.layernorm_ext_cuda_emulated.<op>``, with the same schemas as
``torch.ops.layernorm_ext`` and CPU tensors in and out. The CUDA toolkit's
headers give the types (cuda_fp16.h, cuda_bf16.h, cuda_runtime_api.h); no CUDA
library is linked and no GPU is needed.

``load()`` builds once into ``build/cuda_emulated[_asan]-torch<version>`` under the
repository root (or ``LAYERNORM_EXT_EMULATOR_BUILD_DIR``) and rebuilds only
what changed. ``LAYERNORM_EXT_EMULATOR_SANITIZE=address`` (or
``load(sanitize=True)``) builds with AddressSanitizer, whose runtime must then be
preloaded into the Python process (see ``asan_environment``).
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
MODULE_NAME = "layernorm_ext_cuda_emulated"

# The defines torch's CUDA extension builds pass to nvcc (no implicit
# half/bfloat16 conversions), so that the kernels see the same headers.
CUDA_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]

# sanitize -> the loaded module, or the error its build raised (a build is
# tried once per process).
_loaded = {}


def cuda_include_dir() -> Path:
    """The toolkit's include folder: CUDA_HOME, else nvcc's own TOP, else /usr/local/cuda."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            dry = subprocess.run(
                [nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null"], capture_output=True, text=True, timeout=60
            )
            top = re.search(r"^#\$ TOP=(.*)$", dry.stderr, re.MULTILINE)
            if top:
                candidates.append(Path(top.group(1).strip()))
        except (OSError, subprocess.TimeoutExpired):
            pass
    candidates.append(Path("/usr/local/cuda"))
    for root in candidates:
        if (root / "include" / "cuda_fp16.h").is_file():
            return (root / "include").resolve()
    raise FileNotFoundError(
        "the CUDA executor needs the CUDA toolkit's headers (cuda_fp16.h, cuda_runtime_api.h); "
        f"none found under {', '.join(str(c) for c in candidates)} (set CUDA_HOME)"
    )


def kernel_sources() -> list[Path]:
    return sorted((CSRC / "cuda").glob("*.cu"))


def glue_sources() -> list[Path]:
    return sorted((CSRC / "cuda").glob("*_cuda.cpp"))


def _write_if_changed(path: Path, text: str):
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def _kernel_units(build_dir: Path) -> list[Path]:
    """One .cpp per .cu that includes it (torch's builder hands .cu files to nvcc)."""
    units_dir = build_dir / "kernels"
    units_dir.mkdir(parents=True, exist_ok=True)
    units = []
    for cu in kernel_sources():
        unit = units_dir / f"{cu.stem}.cpp"
        _write_if_changed(unit, f'#include "{cu}"\n')
        units.append(unit)
    return units


def build_directory(sanitize: bool) -> Path:
    """One folder per torch version (its ABI) and sanitizer choice."""
    import torch

    base = os.environ.get("LAYERNORM_EXT_EMULATOR_BUILD_DIR")
    base = Path(base) if base else ROOT / "build"
    return base / f"cuda_emulated{'_asan' if sanitize else ''}-torch{torch.__version__.replace('+', '_')}"


def _wants_sanitizer() -> bool:
    return os.environ.get("LAYERNORM_EXT_EMULATOR_SANITIZE", "") == "address"


def load(sanitize: bool | None = None, verbose: bool = False):
    """Builds (if needed) and imports the executor; returns its Python module.

    Its ops are then ``torch.ops.layernorm_ext_cuda_emulated.*``.
    """
    sanitize = _wants_sanitizer() if sanitize is None else sanitize
    if sanitize not in _loaded:
        try:
            _loaded[sanitize] = _build_and_import(sanitize, verbose)
        except Exception as error:  # noqa: BLE001 - remembered, raised again to every caller
            _loaded[sanitize] = error
    if isinstance(_loaded[sanitize], Exception):
        raise _loaded[sanitize]
    return _loaded[sanitize]


def loaded_module():
    """The executor module this process has loaded, or None."""
    return next((m for m in _loaded.values() if not isinstance(m, Exception)), None)


def _build_and_import(sanitize: bool, verbose: bool):
    build_dir = build_directory(sanitize)
    build_dir.mkdir(parents=True, exist_ok=True)
    # A build killed midway (a test's timeout) leaves torch's lock file, on
    # which every later load of the folder would wait forever: the package's
    # builders' flock removes it (see layernorm_ext._loader).
    from layernorm_ext._loader import _exclusive_build

    with _exclusive_build(build_dir):
        return _build_locked(build_dir, sanitize, verbose)


def _build_locked(build_dir: Path, sanitize: bool, verbose: bool):
    from torch.utils.cpp_extension import load as load_extension

    sources = (
        [HERE / "runtime.cpp", HERE / "fiber.cpp", HERE / "emulated_ops.cpp", HERE / "selftest_kernels.cpp"]
        + _kernel_units(build_dir)
        + glue_sources()
        + [CSRC / "row_norm_checks.cpp", CSRC / "batch_norm_checks.cpp"]
    )
    cflags = [
        "-O1" if sanitize else "-O2",
        "-g" if sanitize else "-g0",
        "-fopenmp",
        "-fvisibility=hidden",
        "-DLAYERNORM_EXT_CUDA_EMULATOR",
        "-include",
        str(HERE / "cuda_emulator.h"),
        f"-I{HERE}",
        f"-I{cuda_include_dir()}",
        "-Wno-unknown-pragmas",
        *CUDA_DEFINES,
    ]
    ldflags = ["-fopenmp"]
    if sanitize:
        cflags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
    module = load_extension(
        name=MODULE_NAME + ("_asan" if sanitize else ""),
        sources=[str(s) for s in sources],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        build_directory=str(build_dir),
        with_cuda=False,
        verbose=verbose,
    )
    return module


def _compiler_library(name: str) -> str:
    """The compiler's own copy of a runtime library (its full path), or ""."""
    try:
        found = subprocess.run(
            [os.environ.get("CXX", "c++"), f"-print-file-name={name}"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return ""
    return os.path.realpath(found) if os.path.isabs(found) and os.path.exists(found) else ""


def asan_available() -> bool:
    """Whether the compiler has an AddressSanitizer runtime to preload."""
    return bool(_compiler_library("libasan.so"))


def asan_environment() -> dict:
    """Environment for a Python process that loads the sanitizer build."""
    env = dict(os.environ)
    # libstdc++ too: python itself does not link it, and without it loaded
    # first the sanitizer cannot intercept C++ throws (every torch error would
    # abort the process).
    env["LD_PRELOAD"] = " ".join([_compiler_library("libasan.so"), _compiler_library("libstdc++.so")])
    # torch and Python leak by design at exit; OpenMP and the fibers need no
    # use-after-return bookkeeping.
    env["ASAN_OPTIONS"] = "detect_leaks=0:detect_stack_use_after_return=0:abort_on_error=1"
    env["LAYERNORM_EXT_EMULATOR_SANITIZE"] = "address"
    return env


def kernel_symbols(library: str) -> dict[int, str]:
    """Offset -> demangled name of every kernel (a function named *_kernel<...>) in the library."""
    nm = subprocess.run(["nm", "-C", "--defined-only", library], capture_output=True, text=True, check=True)
    kernels = {}
    for line in nm.stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) != 3 or parts[1] not in ("t", "T", "W", "w"):
            continue
        name = parts[2]
        if "[clone" in name or not re.search(r"^void layernorm_ext::cuda::.*::\w+_kernel<", name):
            continue
        kernels[int(parts[0], 16)] = name
    return kernels
