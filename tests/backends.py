"""Where the tests run the ops: the backends, each an op namespace and the
device its tensors live on.

- ``cpu``: torch.ops.layernorm_ext on CPU tensors;
- ``cuda``: torch.ops.layernorm_ext on a real GPU (unavailable without one,
  or without the extension's CUDA kernels);
- ``cuda_emulated``: the CUDA kernels' launchers bound to CPU tensors through
  the tests' CPU executor, as torch.ops.layernorm_ext_cuda_emulated (built by
  tests/cuda_emulator/build.py on first use). Tests on it carry the
  ``cuda_emulated`` marker (``pytest -m cuda_emulated`` selects them).
"""

import dataclasses

import pytest
import torch

import layernorm_ext


def _cuda_available():
    usable = torch.cuda.is_available() and layernorm_ext.build_info()["cuda"]
    return usable, (
        "needs a CUDA GPU and layernorm_ext built with its CUDA kernels "
        f"(torch.cuda.is_available()={torch.cuda.is_available()}, "
        f"build_info()['cuda']={layernorm_ext.build_info()['cuda']})"
    )


def _emulator():
    """(the executor build's op namespace, None), or (None, why it is not
    there): build.load tries the build once per process, whatever its outcome."""
    try:
        from cuda_emulator import build

        build.load()
        return torch.ops.layernorm_ext_cuda_emulated, None
    except Exception as error:  # noqa: BLE001 - any import or build failure: unavailable
        return None, f"CUDA executor build (tests/cuda_emulator) unavailable: {type(error).__name__}: {error}"


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str  # "cpu", "cuda", "cuda_emulated"
    device: str  # where its tensors live

    def ops(self):
        """The op namespace, with the forward and backward ops of op_db.OP_DB."""
        if self.name == "cuda_emulated":
            namespace, reason = _emulator()
            if namespace is None:
                raise RuntimeError(reason)
            return namespace
        return torch.ops.layernorm_ext

    def available(self) -> tuple[bool, str]:
        """(usable here, the reason when not)."""
        if self.name == "cuda":
            return _cuda_available()
        if self.name == "cuda_emulated":
            namespace, reason = _emulator()
            return namespace is not None, reason or ""
        return True, ""


BACKENDS = [Backend("cpu", "cpu"), Backend("cuda", "cuda"), Backend("cuda_emulated", "cpu")]
_BY_NAME = {backend.name: backend for backend in BACKENDS}


def backend(name) -> Backend:
    return _BY_NAME[name]


def backend_params(*names):
    """pytest params of the named backends (every one when none are named), with
    ids the names: a skip mark with the reason on cuda where it is not
    available, the cuda_emulated marker on cuda_emulated, whose availability
    (a build of minutes) is probed only when one of its tests is about to
    run (cuda_emulator/pytest_plugin.py skips it then, with the reason, or
    fails it in CI)."""
    params = []
    for name in names or tuple(_BY_NAME):
        if name == "cuda_emulated":
            marks = [pytest.mark.cuda_emulated]
        else:
            usable, reason = backend(name).available()
            marks = [] if usable else [pytest.mark.skip(reason=reason)]
        params.append(pytest.param(backend(name), id=name, marks=marks))
    return params
