"""fused_add_layer_norm / fused_add_rms_norm: the sum rounded like the
separate add, gradients (against the unfused composition, through the
statistics), torch.compile and bad input (their float64 parity over the
registry's samples is in test_float64_reference.py, gradcheck in
test_gradcheck.py, opcheck in test_opcheck.py)."""

import pytest
import torch
import torch.nn.functional as F

import layernorm_ext

from layernorm_ext.op_db import DTYPES, op_info

FUSED = [pytest.param(op_info(name), id=name) for name in ("fused_add_layer_norm", "fused_add_rms_norm")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fused", FUSED)
def test_sum_is_rounded_like_the_separate_add(fused, dtype):
    """The returned sum is input + residual rounded to the dtype, bit for bit,
    in every layout (its output is checked in test_float64_reference.py)."""
    for sample in fused.sample_inputs("cpu", dtype):
        x, r = sample.args[:2]
        _, total = fused.op(*sample.args)
        assert total.dtype == dtype and torch.equal(total, x + r), sample


def _inputs(shape, normalized_shape, dtype):
    """x, residual, weight, bias of a fused_add_layer_norm sample."""
    sample = op_info("fused_add_layer_norm").make_sample(
        shape, "cpu", dtype, norm_dims=len(normalized_shape))
    x, r, _, w, b, _ = sample.args
    return x, r, w, b


def _gradcheck_inputs():
    x, r, w, b = _inputs((3, 4, 6), (4, 6), torch.float64)
    return [t.requires_grad_() for t in (x, r, w, b)]


@pytest.mark.parametrize("use_sum", [True, False])
def test_gradients_match_unfused_composition(use_sum):
    x, r, w, b = _gradcheck_inputs()
    leaves = [t.detach().clone().requires_grad_() for t in (x, r, w, b)]
    out, s = layernorm_ext.fused_add_layer_norm(x, r, (4, 6), w, b)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    if use_sum:
        loss = loss + (s**2).sum()
    loss.backward()
    s_ref = leaves[0] + leaves[1]
    out_ref = F.layer_norm(s_ref, (4, 6), leaves[2], leaves[3])
    loss_ref = (out_ref * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    if use_sum:
        loss_ref = loss_ref + (s_ref**2).sum()
    loss_ref.backward()
    for got, ref in zip((x, r, w, b), leaves):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-10, atol=1e-12)


def test_only_residual_requires_grad():
    x, r, w, _ = _inputs((3, 8), (8,), torch.float64)
    r.requires_grad_()
    out, _ = layernorm_ext.fused_add_rms_norm(x, r, (8,), w)
    out.sum().backward()
    r2 = r.detach().clone().requires_grad_()
    F.rms_norm(x + r2, (8,), w, torch.finfo(torch.float64).eps).sum().backward()
    torch.testing.assert_close(r.grad, r2.grad)


def test_torch_compile_fullgraph():
    x, r, w, b = _inputs((4, 32), (32,), torch.float32)

    def block(x, r, w, b):
        y, s = layernorm_ext.fused_add_layer_norm(x, r, (32,), w, b)
        z, s2 = layernorm_ext.fused_add_rms_norm(y, s, (32,), w)
        return z * 2, s2

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for got, ref in zip(compiled(x, r, w, b), block(x, r, w, b)):
        torch.testing.assert_close(got, ref)


def test_bad_residual_raises_clear_errors():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match=r"fused_add_layer_norm: expected residual of the input's shape"):
        layernorm_ext.fused_add_layer_norm(x, torch.randn(2, 9), (8,))
    with pytest.raises(RuntimeError, match=r"fused_add_rms_norm: expected residual of the input's dtype"):
        layernorm_ext.fused_add_rms_norm(x, torch.randn(2, 8, dtype=torch.float64), (8,))
    with pytest.raises(RuntimeError, match=r"normalized_shape"):
        layernorm_ext.fused_add_layer_norm(x, torch.randn(2, 8), (7,))


def test_gradcheck_through_statistics_and_double_backward():
    x, r, w, b = _gradcheck_inputs()

    def layer(x, r, w, b):
        return torch.ops.layernorm_ext.fused_add_layer_norm_forward(x, r, [4, 6], w, b, 1e-5)

    def rms(x, r, w):
        return torch.ops.layernorm_ext.fused_add_rms_norm_forward(x, r, [4, 6], w, 1e-6)

    # Every output (mean and rstd too) feeds the checked function.
    assert torch.autograd.gradcheck(layer, (x, r, w, b))
    assert torch.autograd.gradcheck(rms, (x, r, w))
    assert torch.autograd.gradgradcheck(lambda x, r, w, b: layer(x, r, w, b)[0], (x, r, w, b))
    assert torch.autograd.gradgradcheck(lambda x, r, w: rms(x, r, w)[0], (x, r, w))
