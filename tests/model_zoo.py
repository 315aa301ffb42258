"""transformers and timm for the tests and benchmarks of replace_norms on real
models: their imports, and the small models built from configs.

timm imports torchvision at import time, for a few names it needs only in
code these tests do not run (FrozenBatchNorm2d, feature extraction, data
transforms). Where torchvision is missing or fails to import (the local
mirror's wheels are CUDA builds, which fail under a CPU torch with
"operator torchvision::nms does not exist"), ``import_timm`` puts a stand-in
torchvision in this process's ``sys.modules`` (nothing installed, nothing
outside the process touched) whose every name is an inert placeholder class.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

import pytest


class _Placeholder(type):
    """A class whose every attribute is another placeholder class (timm reads
    enum members such as ``InterpolationMode.NEAREST`` at import time)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {"__module__": cls.__module__})


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = _Placeholder(name, (), {"__module__": self.__name__})
        setattr(self, name, placeholder)
        return placeholder


class _PlaceholderTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``torchvision`` and every ``torchvision.*`` as placeholder packages."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


def import_timm():
    """timm, or a skip when it is not installed (requirements-models.txt)."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install --no-deps -r requirements-models.txt)")
    if not _torchvision_imports():
        sys.meta_path.insert(0, _PlaceholderTorchvision())
    import timm

    return timm


def import_transformers():
    """transformers, or a skip when it is not installed (requirements-models.txt)."""
    return pytest.importorskip(
        "transformers", reason="transformers is not installed (see requirements-models.txt)"
    )
