"""Builds layernorm_ext._C: CPU kernels always, CUDA kernels when the installed
torch is a CUDA build and a CUDA toolkit is found (LAYERNORM_EXT_CUDA=0 or 1
forces the choice). Install with ``pip install --no-build-isolation .`` so that
the extension is built against the torch you have.
"""

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

import torch

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_sources", ROOT / "layernorm_ext" / "_sources.py")
sources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sources)

# Before torch's build helpers are imported: they read CUDA_HOME once.
WITH_CUDA = sources.configure_cuda_build(torch)

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package, so that an installed wheel can JIT-build too."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "layernorm_ext" / "csrc"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(ROOT / "csrc", target)


def extension():
    csrc = ROOT / "csrc"
    cpu = [str(p.relative_to(ROOT)) for p in sources.cpu_sources(csrc)]
    if WITH_CUDA:
        cuda = [str(p.relative_to(ROOT)) for p in sources.cuda_sources(csrc)]
        return CUDAExtension(
            "layernorm_ext._C",
            cpu + cuda,
            extra_compile_args={
                "cxx": sources.CXX_FLAGS + ["-DLAYERNORM_EXT_WITH_CUDA"],
                "nvcc": sources.NVCC_FLAGS,
            },
            extra_link_args=sources.LD_FLAGS,
        )
    return CppExtension(
        "layernorm_ext._C",
        cpu,
        extra_compile_args={"cxx": sources.CXX_FLAGS},
        extra_link_args=sources.LD_FLAGS,
    )


setup(
    name="layernorm_ext",
    version="0.1.0",
    description="Fast, exact LayerNorm, RMSNorm and BatchNorm kernels for PyTorch (CPU and CUDA)",
    packages=["layernorm_ext"],
    python_requires=">=3.10",
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension, "build_py": BuildPyWithSources},
    zip_safe=False,
)
