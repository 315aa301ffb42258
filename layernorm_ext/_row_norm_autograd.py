"""Autograd formulas of the backward ops, shared by the norms (LayerNorm and
BatchNorm: center=True, RMSNorm: center=False), written in differentiable
torch ops so that the backward ops have their own derivatives (double
backward, gradient penalties). The forward ops' autograd is C++
(csrc/autograd.cpp): it calls the backward ops, whose derivatives these are.

Notation, per group of N elements normalized together (a row of a row norm,
a channel of BatchNorm in training): xhat = (x - mean) * rstd (mean = 0
without centering), g = grad_output * weight, and the backward op computes

    grad_input  = rstd * (g - a - xhat * b),  a = sum(g) / N (0 without centering),
                                              b = sum(g * xhat) / N
    grad_weight = sum of grad_output * xhat over what shares a weight
    grad_bias   = sum of grad_output over what shares a bias

The backward ops take mean and rstd as inputs, so their derivatives below are
partial in them; the forward ops' backward (in C++, in differentiable ATen
ops) adds the path through the statistics (d mean / dx = 1/N,
d rstd / dx = -rstd^2 * xhat / N).
"""

import torch

# All formulas work on 2-D views: `rows` groups of `cols` elements, each group
# normalized by its own mean and rstd (shape (rows, 1)). The affine parameters
# broadcast against (rows, cols) and their gradients are sums over
# `param_dim`: 0 for LayerNorm/RMSNorm (one weight per column, shape
# (1, cols)), 1 for BatchNorm (one weight per channel row, shape (rows, 1)).


def backward_of_backward_2d(center, grad_output, x, mean, rstd, weight, gx, gw, gb, param_dim):
    """Gradients of the backward op's outputs (grad_input, grad_weight, grad_bias),
    weighted by their incoming gradients gx, gw, gb (each may be None: zero),
    with respect to (grad_output, x, mean, rstd, weight): partial in mean and
    rstd. Returns them in the accumulation dtype, shaped like the 2-D inputs
    (None for mean when not centering, and for weight when there is none)."""
    acc = rstd.dtype
    go = grad_output.to(acc)
    x = x.to(acc)
    cols = x.shape[1]
    mu = mean if center else 0.0
    xhat = (x - mu) * rstd
    w = weight.to(acc) if weight is not None else None
    g = go * w if w is not None else go

    b = (g * xhat).sum(1, keepdim=True) / cols
    if gx is not None:
        gx = gx.to(acc)
        s1 = gx.sum(1, keepdim=True) if center else 0.0
        s2 = (gx * xhat).sum(1, keepdim=True)
        d_g = rstd * (gx - s1 / cols - xhat * s2 / cols)
        d_xhat = rstd * (-g * s2 / cols - b * gx)
        a = g.sum(1, keepdim=True) / cols if center else 0.0
        d_rstd = (gx * g).sum(1, keepdim=True) - a * s1 - b * s2
    else:
        d_g = torch.zeros_like(g)
        d_xhat = torch.zeros_like(xhat)
        d_rstd = torch.zeros_like(rstd)
    if gw is not None:
        d_xhat = d_xhat + gw.to(acc) * go

    d_grad_output = d_g * w if w is not None else d_g
    if gw is not None:
        d_grad_output = d_grad_output + gw.to(acc) * xhat
    if gb is not None:
        d_grad_output = d_grad_output + gb.to(acc)
    d_x = d_xhat * rstd
    d_mean = -(d_xhat * rstd).sum(1, keepdim=True) if center else None
    d_rstd = d_rstd + (d_xhat * (x - mu)).sum(1, keepdim=True)
    d_weight = (d_g * go).sum(param_dim, keepdim=True) if weight is not None else None
    return d_grad_output, d_x, d_mean, d_rstd, d_weight


# LayerNorm / RMSNorm: rows of the trailing normalized_shape; statistics shaped
# like the batch dims, parameters like normalized_shape.


def _rows(t, cols):
    return t.reshape(-1, cols)


def backward_of_backward(
    center, grad_output, input, mean, rstd, weight, grad_grad_input, grad_grad_weight, grad_grad_bias, cols
):
    """backward_of_backward_2d for a row norm, in the shapes of its op's arguments."""
    row = lambda t: None if t is None else t.reshape(1, cols)  # noqa: E731
    d_grad_output, d_input, d_mean, d_rstd, d_weight = backward_of_backward_2d(
        center,
        _rows(grad_output, cols),
        _rows(input, cols),
        mean.reshape(-1, 1) if center else None,
        rstd.reshape(-1, 1),
        row(weight),
        None if grad_grad_input is None else _rows(grad_grad_input, cols),
        row(grad_grad_weight),
        row(grad_grad_bias),
        param_dim=0,
    )
    return (
        d_grad_output.reshape(grad_output.shape).to(grad_output.dtype),
        d_input.reshape(input.shape).to(input.dtype),
        d_mean.reshape(mean.shape) if center else None,
        d_rstd.reshape(rstd.shape),
        d_weight.reshape(weight.shape).to(weight.dtype) if weight is not None else None,
    )
