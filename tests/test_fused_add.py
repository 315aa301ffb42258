"""fused_add_layer_norm / fused_add_rms_norm: values against float64
references (F.layer_norm / F.rms_norm of x + r), gradients (gradcheck and
against the unfused composition), opcheck, torch.compile and bad input."""

import pytest
import torch
import torch.nn.functional as F

import layernorm_ext

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Tolerances relative to the reference's magnitude: one rounding of the dtype
# plus float32 accumulation.
TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = [((0, 8), (8,)), ((1, 1), (1,)), ((3, 5), (5,)), ((4, 7, 33), (7, 33)), ((5, 4099), (4099,))]


def _inputs(shape, normalized_shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(normalized_shape, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(normalized_shape, generator=g, dtype=torch.float64).to(dtype)
    return x, r, w, b


def _assert_close(actual, expected, dtype):
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, atol=TOL[dtype] * scale, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,normalized_shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_float64_reference(dtype, shape, normalized_shape, affine):
    x, r, w, b = _inputs(shape, normalized_shape, dtype)
    w, b = (w, b) if affine else (None, None)
    out, s = layernorm_ext.fused_add_layer_norm(x, r, normalized_shape, w, b, eps=1e-5)
    # The sum is rounded to the dtype, exactly as the separate add.
    assert s.dtype == dtype and torch.equal(s, x + r)
    ref = F.layer_norm(
        s.double(), normalized_shape,
        None if w is None else w.double(), None if b is None else b.double(), 1e-5,
    )
    assert out.dtype == dtype and out.shape == x.shape
    _assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,normalized_shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_matches_float64_reference(dtype, shape, normalized_shape, affine):
    x, r, w, _ = _inputs(shape, normalized_shape, dtype, seed=1)
    w = w if affine else None
    out, s = layernorm_ext.fused_add_rms_norm(x, r, normalized_shape, w)
    assert torch.equal(s, x + r)
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    ref = F.rms_norm(s.double(), normalized_shape, None if w is None else w.double(), eps)
    _assert_close(out, ref, dtype)


def test_non_contiguous_inputs():
    x, r, w, b = _inputs((6, 40), (40,), torch.float32, seed=2)
    xt, rt = x.t().contiguous().t(), r[:, :].clone().t().contiguous().t()
    assert not xt.is_contiguous()
    out, s = layernorm_ext.fused_add_layer_norm(xt, rt, (40,), w, b)
    ref = F.layer_norm((x + r).double(), (40,), w.double(), b.double())
    _assert_close(out, ref, torch.float32)
    assert torch.equal(s, x + r)


def _gradcheck_inputs(seed):
    x, r, w, b = _inputs((3, 4, 6), (4, 6), torch.float64, seed=seed)
    return [t.requires_grad_() for t in (x, r, w, b)]


def test_layer_norm_gradcheck():
    x, r, w, b = _gradcheck_inputs(3)

    def f(x, r, w, b):
        out, s = layernorm_ext.fused_add_layer_norm(x, r, (4, 6), w, b)
        # Both outputs feed the loss, so the sum's own gradient is checked too.
        return out, s * 0.5

    assert torch.autograd.gradcheck(f, (x, r, w, b))


def test_rms_norm_gradcheck():
    x, r, w, _ = _gradcheck_inputs(4)

    def f(x, r, w):
        out, s = layernorm_ext.fused_add_rms_norm(x, r, (4, 6), w, eps=1e-6)
        return out, s * 0.5

    assert torch.autograd.gradcheck(f, (x, r, w))


@pytest.mark.parametrize("use_sum", [True, False])
def test_gradients_match_unfused_composition(use_sum):
    x, r, w, b = _gradcheck_inputs(5)
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
    x, r, w, _ = _inputs((3, 8), (8,), torch.float64, seed=6)
    r.requires_grad_()
    out, _ = layernorm_ext.fused_add_rms_norm(x, r, (8,), w)
    out.sum().backward()
    r2 = r.detach().clone().requires_grad_()
    F.rms_norm(x + r2, (8,), w, torch.finfo(torch.float64).eps).sum().backward()
    torch.testing.assert_close(r.grad, r2.grad)


def test_opcheck():
    for dtype in (torch.float32, torch.bfloat16):
        x, r, w, b = _inputs((3, 16), (16,), dtype, seed=7)
        x.requires_grad_()
        r.requires_grad_()
        w.requires_grad_()
        b.requires_grad_()
        torch.library.opcheck(
            torch.ops.layernorm_ext.fused_add_layer_norm_forward, (x, r, [16], w, b, 1e-5)
        )
        torch.library.opcheck(
            torch.ops.layernorm_ext.fused_add_layer_norm_forward, (x, r, [16], None, None, 1e-5)
        )
        torch.library.opcheck(
            torch.ops.layernorm_ext.fused_add_rms_norm_forward, (x, r, [16], w, 1e-6)
        )


def test_torch_compile_fullgraph():
    x, r, w, b = _inputs((4, 32), (32,), torch.float32, seed=8)

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
    x, r, w, b = _gradcheck_inputs(9)

    def layer(x, r, w, b):
        return torch.ops.layernorm_ext.fused_add_layer_norm_forward(x, r, [4, 6], w, b, 1e-5)

    def rms(x, r, w):
        return torch.ops.layernorm_ext.fused_add_rms_norm_forward(x, r, [4, 6], w, 1e-6)

    # Every output (mean and rstd too) feeds the checked function.
    assert torch.autograd.gradcheck(layer, (x, r, w, b))
    assert torch.autograd.gradcheck(rms, (x, r, w))
    assert torch.autograd.gradgradcheck(lambda x, r, w, b: layer(x, r, w, b)[0], (x, r, w, b))
    assert torch.autograd.gradgradcheck(lambda x, r, w: rms(x, r, w)[0], (x, r, w))
