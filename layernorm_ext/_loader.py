"""Loading the compiled extension: the prebuilt ``layernorm_ext._C`` or a JIT build.

``import layernorm_ext`` calls :func:`ensure_loaded`: it uses the JIT build when
``LAYERNORM_EXT_JIT=1``, else the prebuilt ``_C``, and falls back to the JIT
build when no prebuilt ``_C`` can be imported (a bare source checkout).
Both register ``TORCH_LIBRARY(layernorm_ext)``, which a process may do once,
so only one of them is ever loaded. A source tree without a build that
shadows an installed build uses the installed one (:func:`use_installed_build`).
"""

import contextlib
import fcntl
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from . import _sources

JIT_MODULE_NAME = "layernorm_ext_jit"

_loaded = {"module": None, "source": None}


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

    # Sets CUDA_HOME (and a default arch list) before torch's builder reads them.
    with_cuda = _sources.configure_cuda_build(torch)
    from torch.utils.cpp_extension import _get_build_directory, load

    root = _sources.source_root()
    sources = _sources.cpu_sources(root) + (_sources.cuda_sources(root) if with_cuda else [])
    if build_directory is None:
        build_directory = _get_build_directory(JIT_MODULE_NAME, verbose)
    os.makedirs(build_directory, exist_ok=True)
    with _exclusive_build(Path(build_directory)):
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


# torch's builder serializes builds with a lock file ("lock") in the build
# folder and waits, forever, while it exists; a builder killed mid-build leaves
# it behind. Our builders first take an flock on a file beside it, which the
# kernel releases when its holder dies: whoever holds the flock is the only live
# builder of ours, so a "lock" it finds was left by a dead one. The dead one's
# ninja may still be compiling there (killing a process leaves its children):
# it is waited for, found by its current folder.
_BUILDER_FLOCK_NAME = "layernorm_ext_builder.flock"
_TORCH_LOCK_NAME = "lock"


def _processes_working_in(directory: Path) -> list[int]:
    """The processes whose current folder is ``directory`` (Linux's /proc; none elsewhere)."""
    target = str(directory.resolve())
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(entry / "cwd") == target:
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


@contextlib.contextmanager
def _exclusive_build(build_directory: Path):
    with open(build_directory / _BUILDER_FLOCK_NAME, "w") as flock_file:
        try:
            fcntl.flock(flock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"layernorm_ext: waiting for another process building the extension in "
                f"{build_directory}",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(flock_file, fcntl.LOCK_EX)
        stale_lock = build_directory / _TORCH_LOCK_NAME
        if stale_lock.exists() and (orphans := _processes_working_in(build_directory)):
            print(
                f"layernorm_ext: waiting for processes {orphans}, left compiling in "
                f"{build_directory} by a build that was killed",
                file=sys.stderr,
                flush=True,
            )
            while _processes_working_in(build_directory):
                time.sleep(1)
        if stale_lock.exists():
            print(
                f"layernorm_ext: removing {stale_lock}, left by a build that was killed (no "
                "live builder holds it)",
                file=sys.stderr,
                flush=True,
            )
            stale_lock.unlink()
        yield


def _has_compiled_module(package_dir: Path) -> bool:
    return any(
        (package_dir / f"_C{suffix}").is_file() for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )


def installed_build_shadowed_by(package_dir: Path, search_path: list[str]) -> Path | None:
    """The folder of an installed layernorm_ext with a built ``_C`` that the
    source tree ``package_dir`` (no ``_C``) shadows on ``search_path``, else None.

    The usual case: ``pip install .`` then ``python -m layernorm_ext`` in the
    repository root, whose ``layernorm_ext/`` comes first on ``sys.path``.
    """
    if os.environ.get("LAYERNORM_EXT_JIT") == "1" or _has_compiled_module(package_dir):
        return None
    ours = package_dir.resolve().parent
    others = [entry for entry in search_path if Path(entry or ".").resolve() != ours]
    spec = importlib.machinery.PathFinder.find_spec("layernorm_ext", others)
    if spec is None or not spec.submodule_search_locations:
        return None
    installed = Path(next(iter(spec.submodule_search_locations)))
    return installed if _has_compiled_module(installed) else None


def use_installed_build(package_path: list[str]) -> None:
    """If this package is a source tree shadowing an installed build, point
    ``package_path`` (the package's ``__path__``) at the installed package, so
    that every submodule (``_C``, the Python wrappers, ``__main__``) comes from
    it, and say so in one line; a source tree without a build would otherwise
    JIT-build every source again."""
    installed = installed_build_shadowed_by(Path(package_path[0]), sys.path)
    if installed is None:
        return
    print(
        f"layernorm_ext: the source tree {package_path[0]} (no build) shadows the installed "
        f"package; using the installed build in {installed} (LAYERNORM_EXT_JIT=1 builds the "
        "source tree instead)",
        file=sys.stderr,
        flush=True,
    )
    package_path[:] = [str(installed)]
    # This module and _sources came from the source tree: load the installed ones.
    for name in ("layernorm_ext._loader", "layernorm_ext._sources"):
        sys.modules.pop(name, None)


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
