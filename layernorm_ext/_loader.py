"""Loading the compiled extension: the prebuilt ``layernorm_ext._C`` or a JIT build.

``import layernorm_ext`` calls :func:`ensure_loaded`: it uses the JIT build when
``LAYERNORM_EXT_JIT=1``, else the prebuilt ``_C``, and falls back to the JIT
build when no prebuilt ``_C`` can be imported (a bare source checkout).
Both register ``TORCH_LIBRARY(layernorm_ext)``, which a process may do once,
so only one of them is ever loaded.
"""

import importlib
import importlib.util
import os
import warnings

import torch

from . import _sources

JIT_MODULE_NAME = "layernorm_ext_jit"

_loaded = {"module": None, "source": None}


def _cuda_toolchain_present() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def load_jit(verbose: bool = False, build_directory: str | None = None):
    """Build the extension from the package's own sources and load it.

    Uses ``torch.utils.cpp_extension.load``; builds are cached (in
    ``build_directory``, else torch's extension cache, ``TORCH_EXTENSIONS_DIR``)
    and rebuilt only when a source or flag changes. CUDA kernels are included
    when torch is a CUDA build and a CUDA toolkit is found
    (``LAYERNORM_EXT_CUDA=0``/``1`` forces the choice). Returns the loaded module.

    Raises RuntimeError if the prebuilt extension is already loaded in this process.
    """
    if _loaded["source"] == "prebuilt":
        raise RuntimeError(
            "layernorm_ext: the prebuilt extension (layernorm_ext._C) is already loaded in this "
            "process; a JIT build would register the same ops twice. Set LAYERNORM_EXT_JIT=1 "
            "before importing layernorm_ext to use the JIT build instead."
        )
    if _loaded["source"] == "jit":
        return _loaded["module"]

    from torch.utils.cpp_extension import load

    root = _sources.source_root()
    with_cuda = _wants_cuda(_cuda_toolchain_present())
    sources = _sources.cpu_sources(root) + (_sources.cuda_sources(root) if with_cuda else [])
    if build_directory is not None:
        os.makedirs(build_directory, exist_ok=True)
    module = load(
        name=JIT_MODULE_NAME,
        sources=[str(s) for s in sources],
        extra_cflags=_sources.CXX_FLAGS + (["-DLAYERNORM_EXT_WITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=_sources.NVCC_FLAGS,
        extra_ldflags=_sources.LD_FLAGS,
        build_directory=build_directory,
        with_cuda=with_cuda,
        verbose=verbose,
    )
    _loaded.update(module=module, source="jit")
    return module


def _wants_cuda(toolchain_present: bool) -> bool:
    forced = os.environ.get("LAYERNORM_EXT_CUDA")
    if forced in ("0", "1"):
        return forced == "1"
    return toolchain_present


def ensure_loaded():
    """Load the extension once per process (see the module docstring)."""
    if _loaded["module"] is not None:
        return _loaded["module"]
    if os.environ.get("LAYERNORM_EXT_JIT") == "1":
        return load_jit()
    if importlib.util.find_spec("layernorm_ext._C") is None:
        return load_jit()
    try:
        module = importlib.import_module("layernorm_ext._C")
    except ImportError as error:
        # A _C built against another torch fails to load before it registers
        # anything, so building from source is safe.
        warnings.warn(
            f"layernorm_ext: the prebuilt extension failed to load ({error}); building it "
            "from source instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return load_jit()
    _loaded.update(module=module, source="prebuilt")
    return module


def build_info() -> dict:
    """How the loaded extension was built and what it runs on.

    Keys: ``cuda`` (CUDA kernels compiled in), ``cuda_available`` (a GPU usable
    now), ``openmp`` (OpenMP compiled in), ``threads`` (torch's intra-op
    threads, which the CPU kernels use), ``simd`` (the instruction set the CPU
    kernels dispatch to: ``"avx512"``, ``"avx2"`` or ``"scalar"``),
    ``torch_version``, ``source`` (``"prebuilt"`` or ``"jit"``).
    """
    module = ensure_loaded()
    compiled = module.compiled_with()
    return {
        "cuda": bool(compiled["cuda"]),
        "cuda_available": bool(compiled["cuda"]) and torch.cuda.is_available(),
        "openmp": bool(compiled["openmp"]),
        "threads": torch.get_num_threads(),
        "simd": str(compiled["simd"]),
        "torch_version": torch.__version__,
        "source": _loaded["source"],
    }
