"""Property-based tests (hypothesis): random shapes, dtypes, strides, eps and
affine options; every op, forward and backward, against torch.nn.functional
in float64."""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import layernorm_ext
from layernorm_ext.op_db import op_info

SETTINGS = settings(
    max_examples=int(os.environ.get("LAYERNORM_EXT_PROPERTY_EXAMPLES", "100")),
    deadline=None,
    derandomize=True,  # the same examples on every run: CI never turns red by chance
    suppress_health_check=[HealthCheck.too_slow],
)
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])


@st.composite
def strided_inputs(draw, dtype, min_dims=1, max_dims=4, max_side=9):
    """A random tensor with a random layout: permuted, sliced with a step, or expanded."""
    shape = draw(st.lists(st.integers(0, max_side), min_size=min_dims, max_size=max_dims))
    layout = draw(st.sampled_from(["contiguous", "permuted", "stepped", "expanded"]))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    shift = draw(st.sampled_from([0.0, 5.0, -100.0]))

    def random(size):
        return (torch.randn(size, generator=generator, dtype=torch.float64) * scale + shift).to(dtype)

    if layout == "permuted" and len(shape) >= 2:
        order = draw(st.permutations(range(len(shape))))
        base = random([shape[i] for i in order])
        inverse = [order.index(i) for i in range(len(shape))]
        x = base.permute(*inverse)
    elif layout == "stepped":
        x = random([*shape[:-1], 2 * shape[-1]])[..., ::2]
    elif layout == "expanded" and len(shape) >= 2:
        x = random([1, *shape[1:]]).expand(shape)
    else:
        x = random(shape)
    assert list(x.shape) == shape
    return x


@st.composite
def row_norm_cases(draw):
    dtype = draw(DTYPES)
    x = draw(strided_inputs(dtype))
    ndims = draw(st.integers(1, x.dim()))
    normalized_shape = tuple(x.shape[x.dim() - ndims :])
    affine = draw(st.sampled_from(["both", "weight", "bias", "none"]))
    param_dtype = draw(st.sampled_from([dtype, torch.float32])) if dtype in (torch.bfloat16, torch.float16) else dtype
    weight = torch.randn(normalized_shape, dtype=torch.float64).to(param_dtype) if affine in ("both", "weight") else None
    bias = torch.randn(normalized_shape, dtype=torch.float64).to(param_dtype) if affine in ("both", "bias") else None
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1, 1e-12]))
    return x, normalized_shape, weight, bias, eps


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def _double_leaf(t):
    # Contiguous: the same function, and torch's CPU batch_norm backward in
    # eval returns wrong gradients for some inputs whose size-1 dims make the
    # layout ambiguous (e.g. shape (1, 2, 2, 1) with strides (1, 1, 2, 1)).
    return None if t is None else t.detach().contiguous().double().requires_grad_()


def row_condition(x, normalized_shape, eps):
    """1 + max |mean| / sqrt(var + eps) over rows: float32 statistics lose about
    this many ulps to cancellation in x - mean, in any implementation."""
    if x.numel() == 0:
        return 1.0
    rows = x.detach().double().reshape(-1, max(1, int(torch.tensor(normalized_shape).prod())))
    mean = rows.mean(-1)
    spread = (rows.var(-1, unbiased=False) + eps).sqrt()
    return 1.0 + (mean.abs() / spread).max().item()


def check_against_float64(name, ours, reference, x, args, dtype, condition=1.0):
    """Forward and backward of ours (in dtype) against reference (in float64),
    within the tolerances of the op called `name`."""
    leaves = [_leaf(x)] + [_leaf(a) for a in args]
    ref_leaves = [_double_leaf(x)] + [_double_leaf(a) for a in args]
    out = ours(*leaves)
    ref = reference(*ref_leaves)
    tol = op_info(name).tolerances[dtype]["rtol"] * condition
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out.double(), ref, atol=tol * scale, rtol=tol)
    if out.numel() == 0:
        return
    grad = torch.randn(ref.shape, dtype=torch.float64)
    wanted = [(a, b) for a, b in zip(leaves, ref_leaves) if a is not None]
    grads = torch.autograd.grad(out, [a for a, _ in wanted], grad.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, [b for _, b in wanted], grad.to(out.dtype).double())
    rows = max(1, x.numel())
    for g, r, (leaf, _) in zip(grads, ref_grads, wanted):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        g_scale = max(1.0, r.abs().max().item())
        g_tol = tol * (1 if leaf is leaves[0] else max(1.0, (rows / max(1, leaf.numel())) ** 0.5))
        torch.testing.assert_close(g.double(), r, atol=g_tol * g_scale * 4, rtol=g_tol * 4)


@SETTINGS
@given(row_norm_cases())
def test_layer_norm_property(case):
    x, normalized_shape, weight, bias, eps = case
    if eps < 1e-6 and x.dtype != torch.float64:
        eps = 1e-5  # a tiny eps with constant rows is ill-conditioned in low precision
    check_against_float64(
        "layer_norm",
        lambda x, w, b: layernorm_ext.layer_norm(x, normalized_shape, w, b, eps),
        lambda x, w, b: F.layer_norm(x, normalized_shape, w, b, eps),
        x, [weight, bias], x.dtype, row_condition(x, normalized_shape, eps),
    )


@SETTINGS
@given(row_norm_cases())
def test_rms_norm_property(case):
    x, normalized_shape, weight, _, eps = case
    if eps < 1e-6 and x.dtype != torch.float64:
        eps = 1e-5
    check_against_float64(
        "rms_norm",
        lambda x, w: layernorm_ext.rms_norm(x, normalized_shape, w, eps),
        lambda x, w: F.rms_norm(x, normalized_shape, w, eps),
        x, [weight], x.dtype,
    )


@st.composite
def batch_norm_cases(draw):
    dtype = draw(DTYPES)
    x = draw(strided_inputs(dtype, min_dims=2, max_dims=5, max_side=6))
    channels = x.shape[1]
    assume(channels > 0)  # torch.nn.functional.batch_norm itself fails on zero channels
    if draw(st.booleans()) and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    training = draw(st.booleans())
    values_per_channel = x.numel() // max(1, channels)
    if training and values_per_channel <= 1:
        training = False  # torch raises there; the error is tested elsewhere
    param_dtype = draw(st.sampled_from([dtype, torch.float32])) if dtype in (torch.bfloat16, torch.float16) else dtype
    affine = draw(st.booleans())
    weight = torch.randn(channels, dtype=torch.float64).to(param_dtype) if affine else None
    bias = torch.randn(channels, dtype=torch.float64).to(param_dtype) if affine else None
    tracked = draw(st.booleans()) or not training
    running_mean = torch.randn(channels, dtype=torch.float64).to(param_dtype) if tracked else None
    running_var = (torch.rand(channels, dtype=torch.float64) + 0.5).to(param_dtype) if tracked else None
    momentum = draw(st.sampled_from([0.1, 0.5, 1.0, 0.0]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    return x, weight, bias, running_mean, running_var, training, momentum, eps


def channel_condition(x, eps):
    """row_condition for BatchNorm's groups: the elements of each channel."""
    if x.numel() == 0:
        return 1.0
    rows = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
    spread = (rows.var(-1, unbiased=False) + eps).sqrt()
    return 1.0 + (rows.mean(-1).abs() / spread).max().item()


@SETTINGS
@given(batch_norm_cases())
def test_batch_norm_property(case):
    x, weight, bias, running_mean, running_var, training, momentum, eps = case
    ours_stats = [None if t is None else t.clone() for t in (running_mean, running_var)]
    ref_stats = [None if t is None else t.double() for t in (running_mean, running_var)]
    condition = channel_condition(x, eps) if training else 1.0
    check_against_float64(
        "batch_norm",
        lambda x, w, b: layernorm_ext.batch_norm(x, *ours_stats, w, b, training, momentum, eps),
        lambda x, w, b: F.batch_norm(x, *ref_stats, w, b, training, momentum, eps),
        x, [weight, bias], x.dtype, condition,
    )
    if training and running_mean is not None and x.numel() > 0:
        for ours, ref in zip(ours_stats, ref_stats):
            assert ours.dtype == running_mean.dtype
            # Rounded to the stats' dtype: a float16 running variance may overflow to inf.
            ref = ref.to(ours.dtype).double()
            tol = op_info("batch_norm").tolerances[ours.dtype]["rtol"] * condition
            finite = ref[torch.isfinite(ref)]
            scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
            torch.testing.assert_close(ours.double(), ref, atol=tol * scale, rtol=tol)
