"""Residual add fused into LayerNorm / RMSNorm, the pre-norm transformer pattern
``s = x + residual; y = norm(s)``: ``fused_add_layer_norm`` and
``fused_add_rms_norm`` return ``(norm(s), s)`` from one pass over the data
(``s`` is written once and normalized while in cache), with the fake kernels
and autograd formulas of the ``layernorm_ext::fused_add_*_forward`` ops.

Backward reuses ``layer_norm_backward`` / ``rms_norm_backward`` on ``s`` (and
the path through the returned statistics, as the plain ops do); the gradient
of ``s`` (from the norm, plus any from the returned ``s``) goes to both
``input`` and ``residual``.
"""

import math

import torch

from ._row_norm_autograd import row_norm_grads
from ._shapes import batch_shape, normalized_shape_list, stats_dtype
from .rms_norm import default_rms_eps

_ops = torch.ops.layernorm_ext


def fused_add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``(layer_norm(input + residual, ...), input + residual)`` in one pass.

    ``input`` and ``residual`` must have the same shape and dtype; the other
    arguments are those of :func:`layernorm_ext.layer_norm`. The sum is
    rounded to the input dtype before it is normalized, as the separate add
    would be.
    """
    output, sum_, _, _ = _ops.fused_add_layer_norm_forward(
        input, residual, normalized_shape_list(normalized_shape), weight, bias, float(eps)
    )
    return output, sum_


def fused_add_rms_norm(input, residual, normalized_shape, weight=None, eps=None):
    """``(rms_norm(input + residual, ...), input + residual)`` in one pass.

    As :func:`fused_add_layer_norm`, for :func:`layernorm_ext.rms_norm`
    (``eps=None`` takes the same default).
    """
    if eps is None:
        eps = default_rms_eps(input.dtype)
    output, sum_, _ = _ops.fused_add_rms_norm_forward(
        input, residual, normalized_shape_list(normalized_shape), weight, float(eps)
    )
    return output, sum_


@torch.library.register_fake("layernorm_ext::fused_add_layer_norm_forward")
def _fused_add_layer_norm_forward_fake(input, residual, normalized_shape, weight, bias, eps):
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
    stats = batch_shape(input, normalized_shape)
    return (
        input.new_empty(input.shape),
        input.new_empty(input.shape),
        input.new_empty(stats, dtype=stats_dtype(input.dtype)),
    )


def _grad_of_sum(ctx, *parts):
    """The gradient of s = input + residual (the sum of the parts that are not
    None), as returned for (input, residual)."""
    grad = None
    for part in parts:
        if part is not None:
            grad = part if grad is None else grad + part
    return (
        grad if ctx.needs_input_grad[0] else None,
        grad if ctx.needs_input_grad[1] else None,
    )


def _layer_norm_setup_context(ctx, inputs, output):
    _, _, normalized_shape, weight, bias, _ = inputs
    _, sum_, mean, rstd = output
    ctx.save_for_backward(sum_, weight, bias, mean, rstd)
    ctx.normalized_shape = normalized_shape
    ctx.cols = math.prod(normalized_shape)
    ctx.set_materialize_grads(False)


def _layer_norm_backward(ctx, grad_output, grad_sum, grad_mean, grad_rstd):
    sum_, weight, bias, mean, rstd = ctx.saved_tensors
    mask = [
        ctx.needs_input_grad[0] or ctx.needs_input_grad[1],
        weight is not None and ctx.needs_input_grad[3],
        bias is not None and ctx.needs_input_grad[4],
    ]
    grad_from_norm, grad_weight, grad_bias = row_norm_grads(
        True, grad_output, sum_, ctx.normalized_shape, ctx.cols, mean, rstd, weight, bias, mask,
        grad_mean, grad_rstd,
    )
    grad_input, grad_residual = _grad_of_sum(ctx, grad_from_norm, grad_sum)
    return grad_input, grad_residual, None, grad_weight, grad_bias, None


def _rms_norm_setup_context(ctx, inputs, output):
    _, _, normalized_shape, weight, _ = inputs
    _, sum_, rstd = output
    ctx.save_for_backward(sum_, weight, rstd)
    ctx.normalized_shape = normalized_shape
    ctx.cols = math.prod(normalized_shape)
    ctx.set_materialize_grads(False)


def _rms_norm_backward(ctx, grad_output, grad_sum, grad_rstd):
    sum_, weight, rstd = ctx.saved_tensors
    mask = [
        ctx.needs_input_grad[0] or ctx.needs_input_grad[1],
        weight is not None and ctx.needs_input_grad[3],
    ]
    grad_from_norm, grad_weight = row_norm_grads(
        False, grad_output, sum_, ctx.normalized_shape, ctx.cols, None, rstd, weight, None, mask,
        None, grad_rstd,
    )
    grad_input, grad_residual = _grad_of_sum(ctx, grad_from_norm, grad_sum)
    return grad_input, grad_residual, None, grad_weight, None


torch.library.register_autograd(
    "layernorm_ext::fused_add_layer_norm_forward",
    _layer_norm_backward,
    setup_context=_layer_norm_setup_context,
)
torch.library.register_autograd(
    "layernorm_ext::fused_add_rms_norm_forward",
    _rms_norm_backward,
    setup_context=_rms_norm_setup_context,
)
