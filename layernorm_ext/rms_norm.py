"""RMSNorm: ``rms_norm`` (as torch.nn.functional.rms_norm) and ``RMSNorm`` (a
drop-in torch.nn.RMSNorm), with the fake kernels of the
``layernorm_ext::rms_norm_forward`` / ``rms_norm_backward`` ops. Both ops'
autograd (reverse and forward mode, any order) is C++ (csrc/autograd_*_ops.cpp);
their vmap rules are in _vmap.py.
"""

from typing import Optional

import torch
from torch._prims_common import suggest_memory_format

from ._eager import direct_calls, is_scripting
from ._shapes import (
    as_normalized_shape,
    batch_shape,
    check_same_device,
    empty_unless,
    stats_dtype,
)

_ops = torch.ops.layernorm_ext


def default_rms_eps(dtype: torch.dtype) -> float:
    """The eps torch uses when RMSNorm's eps is None.

    torch documents ``torch.finfo(input.dtype).eps``, but its kernels take the
    machine epsilon of the type they compute in (see ``stats_dtype``): float32
    for float16/bfloat16 inputs (1.19e-7, not bfloat16's 7.8e-3). We match
    what torch computes. The epsilons are literals (torch.finfo's float64 and
    float32 eps): TorchScript, which compiles this for RMSNorm's forward, has
    no torch.finfo, and a literal costs nothing per call.
    """
    return 2.220446049250313e-16 if dtype == torch.float64 else 1.1920928955078125e-07


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """Root-mean-square normalization over the trailing ``normalized_shape`` dims.

    Same contract as :func:`torch.nn.functional.rms_norm`:
    ``y = x / sqrt(mean(x**2) + eps) * weight``; ``eps=None`` takes the default
    described in :func:`default_rms_eps`.
    """
    if eps is None:
        eps = default_rms_eps(input.dtype)
    normalized_shape = as_normalized_shape(normalized_shape)
    direct = direct_calls(input, weight)
    if direct is not None:
        return direct.rms_norm(input, normalized_shape, weight, float(eps))
    output, _ = _ops.rms_norm_forward(input, normalized_shape, weight, float(eps))
    return output


# torch.fx.symbolic_trace records calls to rms_norm (from RMSNorm.forward) as
# calls, instead of tracing into the eps=None default, which reads the dtype.
torch.fx.wrap("rms_norm")


class RMSNorm(torch.nn.RMSNorm):
    """Drop-in for :class:`torch.nn.RMSNorm`, computed by layernorm_ext's kernels.

    Same arguments, defaults, parameter, ``state_dict`` keys and ``repr``; a
    subclass of torch.nn.RMSNorm. torch.jit.script compiles it to a call of
    the ``layernorm_ext::rms_norm_forward`` op.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if is_scripting():
            eps: Optional[float] = self.eps
            if eps is None:
                eps = default_rms_eps(input.dtype)
            return torch.ops.layernorm_ext.rms_norm_forward(
                input, self.normalized_shape, self.weight, eps
            )[0]
        return rms_norm(input, self.normalized_shape, self.weight, self.eps)


@torch.library.register_fake("layernorm_ext::rms_norm_forward")
def _rms_norm_forward_fake(input, normalized_shape, weight, eps):
    check_same_device("rms_norm", input, weight=weight)
    stats = batch_shape(input, normalized_shape)
    return (
        torch.empty_like(input, memory_format=suggest_memory_format(input)),
        input.new_empty(stats, dtype=stats_dtype(input.dtype)),
    )


@torch.library.register_fake("layernorm_ext::rms_norm_backward")
def _rms_norm_backward_fake(grad_output, input, normalized_shape, rstd, weight, output_mask):
    check_same_device("rms_norm_backward", input, weight=weight, grad_output=grad_output)
    weight_like = weight if weight is not None else input
    return (
        torch.empty_like(input, memory_format=suggest_memory_format(grad_output))
        if output_mask[0]
        else input.new_empty((0,)),
        empty_unless(output_mask[1] and weight is not None, weight_like, normalized_shape),
    )
