"""Autograd formulas shared by the row-wise norms (LayerNorm: center=True,
RMSNorm: center=False), written in differentiable torch ops so that the
backward op has its own derivative (double backward, gradient penalties).

Notation, per row of N elements: xhat = (x - mean) * rstd (mean = 0 without
centering), g = grad_output * weight, and the backward op computes

    grad_input  = rstd * (g - a - xhat * b),  a = sum(g) / N (0 without centering),
                                              b = sum(g * xhat) / N
    grad_weight = sum over rows of grad_output * xhat
    grad_bias   = sum over rows of grad_output

The backward op takes mean and rstd as inputs, so its derivative below is
partial in them; the forward op's backward adds the path through the
statistics (d mean / dx = 1/N, d rstd / dx = -rstd^2 * xhat / N).
"""

import torch


def _rows(t, cols):
    return t.reshape(-1, cols)


def statistics_gradient(input, mean, rstd, grad_mean, grad_rstd, cols):
    """The input gradient that flows back through mean and rstd (None if none does)."""
    if grad_mean is None and grad_rstd is None:
        return None
    x = _rows(input, cols).to(rstd.dtype)
    centered = x - mean.reshape(-1, 1) if mean is not None else x
    grad = torch.zeros_like(x)
    if grad_mean is not None:
        grad = grad + grad_mean.reshape(-1, 1) / cols
    if grad_rstd is not None:
        r = rstd.reshape(-1, 1)
        grad = grad - grad_rstd.reshape(-1, 1) * r.pow(3) * centered / cols
    return grad.reshape(input.shape).to(input.dtype)


def backward_of_backward(
    center, grad_output, input, mean, rstd, weight, grad_grad_input, grad_grad_weight, grad_grad_bias, cols
):
    """Gradients of the backward op's outputs (grad_input, grad_weight, grad_bias),
    weighted by their incoming gradients, with respect to (grad_output, input,
    mean, rstd, weight). Any incoming gradient may be None (zero)."""
    acc = rstd.dtype
    go = _rows(grad_output, cols).to(acc)
    x = _rows(input, cols).to(acc)
    r = rstd.reshape(-1, 1)
    mu = mean.reshape(-1, 1) if center else 0.0
    xhat = (x - mu) * r
    w = weight.reshape(1, cols).to(acc) if weight is not None else None
    g = go * w if w is not None else go
    zero = torch.zeros((), dtype=acc, device=x.device)

    gx = _rows(grad_grad_input, cols).to(acc) if grad_grad_input is not None else None
    gw = grad_grad_weight.reshape(1, cols).to(acc) if grad_grad_weight is not None else None
    gb = grad_grad_bias.reshape(1, cols).to(acc) if grad_grad_bias is not None else None

    b = (g * xhat).sum(-1, keepdim=True) / cols
    # d/d g of sum(gx * grad_input), and d/d xhat of the whole.
    if gx is not None:
        s1 = gx.sum(-1, keepdim=True) if center else zero
        s2 = (gx * xhat).sum(-1, keepdim=True)
        d_g = r * (gx - s1 / cols - xhat * s2 / cols)
        d_xhat = r * (-g * s2 / cols - b * gx)
        a = g.sum(-1, keepdim=True) / cols if center else zero
        d_rstd_explicit = (gx * g).sum(-1, keepdim=True) - a * s1 - b * s2
    else:
        d_g = torch.zeros_like(g)
        d_xhat = torch.zeros_like(xhat)
        d_rstd_explicit = torch.zeros_like(r)
    if gw is not None:
        d_xhat = d_xhat + gw * go

    d_grad_output = d_g * w if w is not None else d_g
    if gw is not None:
        d_grad_output = d_grad_output + gw * xhat
    if gb is not None:
        d_grad_output = d_grad_output + gb
    d_input = d_xhat * r
    d_mean = -(d_xhat * r).sum(-1) if center else None
    d_rstd = (d_xhat * (x - mu)).sum(-1) + d_rstd_explicit.squeeze(-1)
    d_weight = (d_g * go).sum(0).reshape(weight.shape).to(weight.dtype) if weight is not None else None
    return (
        d_grad_output.reshape(grad_output.shape).to(grad_output.dtype),
        d_input.reshape(input.shape).to(input.dtype),
        d_mean.reshape(mean.shape) if center else None,
        d_rstd.reshape(rstd.shape),
        d_weight,
    )
