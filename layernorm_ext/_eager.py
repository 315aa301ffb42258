"""The fast way from a functional wrapper into its forward op, in eager mode.

``torch.ops.layernorm_ext.<op>(...)`` boxes every argument and parses the
schema on each call, which costs as much as a LayerNorm kernel on a small
batch (a decode step's rows; benchmarks/bench_call_overhead.py measures
it). The extension's ``eager`` submodule
(csrc/eager_calls.cpp) calls the same forward ops through the dispatcher
unboxed, so autograd, autocast, dispatch modes and the CPU/CUDA kernels all
apply as before, and returns only what the wrapper uses. What the
dispatcher does not see must go through torch.ops: torch.compile's tracing
(which records torch.ops calls) and ``__torch_function__`` (tensor
subclasses, torch function modes such as ``torch.device`` as a context
manager).
"""

import torch

from ._loader import ensure_loaded

_direct = ensure_loaded().eager
_has_torch_function = torch._C._has_torch_function
_is_compiling = torch.compiler.is_compiling

# The modules' forward branches on this to call torch.ops in TorchScript,
# which compiles only that branch (it sees an aten::is_scripting call, under
# any name). One lookup less per eager call than torch.jit.is_scripting().
is_scripting = torch.jit.is_scripting


def direct_calls(*tensors):
    """The extension's direct calls when they may serve a call with these
    tensor arguments (None allowed), else None: call torch.ops instead."""
    if _is_compiling() or _has_torch_function(tensors):
        return None
    return _direct
