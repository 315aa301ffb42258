"""The op namespace a functional wrapper calls its forward op through.

``torch.ops.layernorm_ext.<op>(...)`` boxes every argument and parses the
schema on each call, about 1.2 us: as long as a LayerNorm kernel on a small
batch (a decode step's rows). The extension's ``eager`` submodule
(csrc/eager_calls.cpp) has the same forward ops with the same arguments,
called through the dispatcher unboxed, so autograd, autocast, dispatch modes
and the CPU/CUDA kernels all apply as before. What the dispatcher does not
see goes through torch.ops: torch.compile's tracing (which records
torch.ops calls) and ``__torch_function__`` (tensor subclasses, torch
function modes such as ``torch.device`` as a context manager).
"""

import torch

from ._loader import ensure_loaded

_direct = ensure_loaded().eager
_ops = torch.ops.layernorm_ext
_has_torch_function = torch._C._has_torch_function
_is_compiling = torch.compiler.is_compiling


def forward_ops(*tensors):
    """The namespace to call a forward op of ``tensors`` (its tensor
    arguments, None allowed) through: the direct calls in eager mode, else
    ``torch.ops.layernorm_ext``. Both take the op's arguments positionally."""
    if _is_compiling() or _has_torch_function(tensors):
        return _ops
    return _direct
