"""Residual add fused into LayerNorm / RMSNorm, the pre-norm transformer pattern
``s = x + residual; y = norm(s)``: ``fused_add_layer_norm`` and
``fused_add_rms_norm`` return ``(norm(s), s)`` from one pass over the data
(``s`` is written once and normalized while in cache), with the fake kernels
of the ``layernorm_ext::fused_add_*_forward`` ops.

Their autograd (C++, csrc/autograd_forward_ops.cpp) reuses ``layer_norm_backward`` /
``rms_norm_backward`` on ``s`` (and the path through the returned statistics,
as the plain ops do); the gradient of ``s`` (from the norm, plus any from the
returned ``s``) goes to both ``input`` and ``residual``.
"""

import torch

from ._eager import direct_calls
from ._shapes import as_normalized_shape, batch_shape, check_same_device, stats_dtype
from .rms_norm import default_rms_eps

_ops = torch.ops.layernorm_ext


def fused_add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``(layer_norm(input + residual, ...), input + residual)`` in one pass.

    ``input`` and ``residual`` must have the same shape and dtype; the other
    arguments are those of :func:`layernorm_ext.layer_norm`. The sum is
    rounded to the input dtype before it is normalized, as the separate add
    would be.
    """
    normalized_shape = as_normalized_shape(normalized_shape)
    direct = direct_calls(input, residual, weight, bias)
    if direct is not None:
        return direct.fused_add_layer_norm(input, residual, normalized_shape, weight, bias, float(eps))
    output, sum_, _, _ = _ops.fused_add_layer_norm_forward(
        input, residual, normalized_shape, weight, bias, float(eps)
    )
    return output, sum_


def fused_add_rms_norm(input, residual, normalized_shape, weight=None, eps=None):
    """``(rms_norm(input + residual, ...), input + residual)`` in one pass.

    As :func:`fused_add_layer_norm`, for :func:`layernorm_ext.rms_norm`
    (``eps=None`` takes the same default).
    """
    if eps is None:
        eps = default_rms_eps(input.dtype)
    normalized_shape = as_normalized_shape(normalized_shape)
    direct = direct_calls(input, residual, weight)
    if direct is not None:
        return direct.fused_add_rms_norm(input, residual, normalized_shape, weight, float(eps))
    output, sum_, _ = _ops.fused_add_rms_norm_forward(
        input, residual, normalized_shape, weight, float(eps)
    )
    return output, sum_


@torch.library.register_fake("layernorm_ext::fused_add_layer_norm_forward")
def _fused_add_layer_norm_forward_fake(input, residual, normalized_shape, weight, bias, eps):
    check_same_device("fused_add_layer_norm", input, weight=weight, bias=bias, residual=residual)
    stats = batch_shape(input, normalized_shape)
    dtype = stats_dtype(input.dtype)
    return (
        input.new_empty(input.shape),
        input.new_empty(input.shape),
        input.new_empty(stats, dtype=dtype),
        input.new_empty(stats, dtype=dtype),
    )


@torch.library.register_fake("layernorm_ext::fused_add_rms_norm_forward")
def _fused_add_rms_norm_forward_fake(input, residual, normalized_shape, weight, eps):
    check_same_device("fused_add_rms_norm", input, weight=weight, residual=residual)
    stats = batch_shape(input, normalized_shape)
    return (
        input.new_empty(input.shape),
        input.new_empty(input.shape),
        input.new_empty(stats, dtype=stats_dtype(input.dtype)),
    )
