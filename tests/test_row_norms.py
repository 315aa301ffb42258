"""LayerNorm and RMSNorm (functional and ops) against torch.nn.functional in float64."""

import pytest
import torch
import torch.nn.functional as F

import layernorm_ext
from samples import DTYPES, TOLERANCE, make_input, sample_inputs, upcast


class RowNorm:
    """One row-wise norm: ours, torch's reference, and whether it takes a bias."""

    def __init__(self, name, ours, reference, has_bias):
        self.name, self.ours, self.reference, self.has_bias = name, ours, reference, has_bias

    def call(self, fn, sample, **kwargs):
        if self.has_bias:
            return fn(sample.input, sample.normalized_shape, sample.weight, sample.bias, **kwargs)
        return fn(sample.input, sample.normalized_shape, sample.weight, **kwargs)

    def reference_on(self, sample, eps):
        """torch's result in float64 on the upcast sample."""
        up = type(sample)(upcast(sample.input), sample.normalized_shape, upcast(sample.weight), upcast(sample.bias))
        return self.call(self.reference, up, eps=eps), up

    def __repr__(self):
        return self.name


NORMS = [
    RowNorm("layer_norm", layernorm_ext.layer_norm, F.layer_norm, has_bias=True),
    RowNorm("rms_norm", layernorm_ext.rms_norm, F.rms_norm, has_bias=False),
]


def assert_matches(actual, reference, dtype, what):
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == reference.shape, f"{what}: shape {actual.shape} vs {reference.shape}"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), reference, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("norm", NORMS, ids=repr)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_float64_reference(norm, dtype):
    for sample in sample_inputs(dtypes=[dtype], with_bias=norm.has_bias):
        out = norm.call(norm.ours, sample, eps=1e-5)
        ref, _ = norm.reference_on(sample, eps=1e-5)
        assert_matches(out, ref, dtype, f"{norm} {sample}")


@pytest.mark.parametrize("norm", NORMS, ids=repr)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_float64_reference(norm, dtype):
    for sample in sample_inputs(dtypes=[dtype], with_bias=norm.has_bias, requires_grad=True):
        if sample.input.numel() == 0:
            continue  # no gradient flows through an empty input; covered by test_empty_inputs
        out = norm.call(norm.ours, sample, eps=1e-5)
        ref, up = norm.reference_on(sample, eps=1e-5)
        grad = torch.randn_like(ref)
        leaves = [t for t in (sample.input, sample.weight, sample.bias) if t is not None]
        ref_leaves = [t for t in (up.input, up.weight, up.bias) if t is not None]
        grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
        ref_grads = torch.autograd.grad(ref, ref_leaves, grad.to(out.dtype).double())
        for name, g, r, leaf in zip(("input", "weight", "bias"), grads, ref_grads, leaves):
            # Parameter gradients sum over rows: scale the tolerance by the row count.
            rows = max(1, sample.input.numel() // max(1, leaf.numel())) if name != "input" else 1
            assert g.dtype == leaf.dtype
            tol = TOLERANCE[dtype] * (1 if name == "input" else max(1.0, rows**0.5))
            torch.testing.assert_close(
                g.double(), r, atol=tol * max(1.0, r.abs().max().item()), rtol=tol,
                msg=lambda m: f"{norm} grad_{name} {sample}: {m}",
            )


AFFINE_CASES = [(norm, affine) for norm in NORMS for affine in ("both", "weight", "bias", "none")
                if norm.has_bias or affine in ("weight", "none")]


@pytest.mark.parametrize("norm, affine", AFFINE_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize(
    "shape, ndims", [((5, 6), 1), ((3, 4, 5), 2), ((2, 1), 1), ((4, 1, 3), 1)]
)
def test_gradcheck_float64(norm, affine, shape, ndims):
    normalized_shape = shape[len(shape) - ndims :]
    x = make_input(shape, torch.float64).requires_grad_()
    w = torch.randn(normalized_shape, dtype=torch.float64, requires_grad=True) if affine in ("both", "weight") else None
    b = torch.randn(normalized_shape, dtype=torch.float64, requires_grad=True) if affine in ("both", "bias") else None
    if norm.has_bias:
        fn = lambda x, w, b: layernorm_ext.layer_norm(x, normalized_shape, w, b)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, b))
    else:
        fn = lambda x, w: layernorm_ext.rms_norm(x, normalized_shape, w)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w))


@pytest.mark.parametrize("norm", NORMS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reduced_input_with_float32_params_matches_torch(norm, dtype):
    """torch's CPU kernels accept float32 weight/bias for a half/bfloat16 input."""
    for sample in sample_inputs(dtypes=[dtype], shapes=[((6, 33), 1)], with_bias=norm.has_bias,
                                param_dtype=torch.float32, requires_grad=True):
        out = norm.call(norm.ours, sample, eps=1e-5)
        ref, _ = norm.reference_on(sample, eps=1e-5)
        assert_matches(out, ref, dtype, f"{norm} {sample}")
        params = [t for t in (sample.weight, sample.bias) if t is not None]
        if params:
            grads = torch.autograd.grad(out.float().sum(), params)
            assert all(g.dtype == torch.float32 for g in grads)


@pytest.mark.parametrize("norm", NORMS, ids=repr)
@pytest.mark.parametrize("mean", [1e4, 1e5])
def test_rows_with_large_mean_normalize_exactly(norm, mean):
    """Two-pass statistics: a large mean and unit spread must not cancel (E[x^2]-E[x]^2 would).

    The bound is one float32 ulp of the mean (1.2e-3 at 1e4), which any float32
    mean carries; a cancelling variance is off by O(1).
    """
    x = torch.randn(64, 1024, dtype=torch.float64).add(mean).float()
    sample = type("S", (), {"input": x, "normalized_shape": (1024,), "weight": None, "bias": None})()
    out = norm.call(norm.ours, sample, eps=1e-5)
    ref = norm.reference(x.double(), (1024,), eps=1e-5)
    ulp = mean * torch.finfo(torch.float32).eps
    torch.testing.assert_close(out.double(), ref, atol=ulp, rtol=0)
    if norm.name == "layer_norm":
        assert out.double().var(dim=-1, unbiased=False).sub(1).abs().max() < 2 * ulp


def test_layer_norm_rows_led_by_an_outlier_normalize_exactly():
    """The one-sweep variance sums squares of x - x[0]; when x[0] lies far from
    the row's mean (here 3e4 against unit values: (mean - x[0])^2 is about 1000
    variances) that sum cancels, and a one-sweep result is off by about 4e-3.
    The kernel must notice and take the squared deviations from the mean."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(64, 1024, generator=g)
    x[:, 0] = 3e4 + torch.randn(64, generator=g)
    x[1::2, 5] = x[1::2, 0]  # some rows with the outlier twice
    reference = F.layer_norm(x.double(), (1024,))
    out = layernorm_ext.layer_norm(x, (1024,))
    torch.testing.assert_close(out.double(), reference, atol=5e-5, rtol=0)


@pytest.mark.parametrize("norm", NORMS, ids=repr)
def test_constant_rows_give_zero_not_nan(norm):
    x = torch.full((3, 17), 2.5)
    out = norm.call(norm.ours, type("S", (), {"input": x, "normalized_shape": (17,), "weight": None, "bias": None})(), eps=1e-5)
    assert torch.isfinite(out).all()
    if norm.name == "layer_norm":
        assert out.abs().max() == 0


@pytest.mark.parametrize("norm", NORMS, ids=repr)
def test_empty_inputs(norm):
    for shape in [(0, 8), (3, 0, 8)]:
        x = torch.randn(shape, requires_grad=True)
        w = torch.randn(8, requires_grad=True)
        args = (x, (8,), w, None) if norm.has_bias else (x, (8,), w)
        out = norm.ours(*args)
        assert out.shape == x.shape
        gx, gw = torch.autograd.grad(out.sum(), (x, w))
        assert gx.shape == x.shape and gw.shape == w.shape and gw.abs().sum() == 0


@pytest.mark.parametrize("norm", NORMS, ids=repr)
def test_same_bits_for_any_thread_count(norm):
    x = torch.randn(512, 4096, requires_grad=True)
    w = torch.randn(4096, requires_grad=True)
    b = torch.randn(4096, requires_grad=True)
    grad = torch.randn(512, 4096)

    def run(threads):
        torch.set_num_threads(threads)
        args = (x, (4096,), w, b) if norm.has_bias else (x, (4096,), w)
        out = norm.ours(*args)
        return [out.detach()] + list(torch.autograd.grad(out, [t for t in args if isinstance(t, torch.Tensor)], grad))

    one, two = run(1), run(2)
    for a, b_ in zip(one, two):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("norm", NORMS, ids=repr)
def test_non_contiguous_grad_output(norm):
    x = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, dtype=torch.float64, requires_grad=True)
    args = (x, (10,), w)
    out = norm.ours(*args)
    ref = norm.reference(*args)
    grad = torch.randn(10, 6, dtype=torch.float64).t()
    assert not grad.is_contiguous()
    for g, r in zip(torch.autograd.grad(out, (x, w), grad), torch.autograd.grad(ref, (x, w), grad)):
        torch.testing.assert_close(g, r)


def test_rms_norm_default_eps_matches_torch():
    for dtype in DTYPES:
        x = torch.randn(4, 9, dtype=dtype) * 1e-4
        torch.testing.assert_close(
            layernorm_ext.rms_norm(x, (9,)).double(), F.rms_norm(x.double(), (9,), eps=torch.finfo(
                torch.float64 if dtype == torch.float64 else torch.float32).eps),
            atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("norm", NORMS, ids=repr)
def test_opcheck(norm):
    op_name = f"{norm.name}_forward"
    op = getattr(torch.ops.layernorm_ext, op_name)
    for sample in sample_inputs(dtypes=[torch.float32, torch.bfloat16], shapes=[((3, 5), 1), ((2, 3, 4), 2)],
                                with_bias=norm.has_bias, requires_grad=True):
        args = [sample.input, list(sample.normalized_shape), sample.weight]
        if norm.has_bias:
            args.append(sample.bias)
        torch.library.opcheck(op, (*args, 1e-5))


def test_opcheck_backward_ops():
    x = torch.randn(4, 6)
    w, b = torch.randn(6), torch.randn(6)
    _, mean, rstd = torch.ops.layernorm_ext.layer_norm_forward(x, [6], w, b, 1e-5)
    dy = torch.randn(4, 6)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(torch.ops.layernorm_ext.layer_norm_backward, (dy, x, [6], mean, rstd, w, b, mask))
    _, rstd = torch.ops.layernorm_ext.rms_norm_forward(x, [6], w, 1e-5)
    for mask in ([True, True], [False, True], [True, False]):
        torch.library.opcheck(torch.ops.layernorm_ext.rms_norm_backward, (dy, x, [6], rstd, w, mask))


class TestErrors:
    @pytest.mark.parametrize("norm", NORMS, ids=repr)
    def test_integer_input(self, norm):
        with pytest.raises(NotImplementedError, match=r"not implemented for 'Long': expected a floating-point input"):
            norm.ours(torch.arange(6).view(2, 3), (3,))

    @pytest.mark.parametrize("norm", NORMS, ids=repr)
    def test_normalized_shape_mismatch(self, norm):
        with pytest.raises(RuntimeError, match=r"Given normalized_shape=\[5\], expected input with shape \[\*, 5\], but got input of size\[2, 3\]"):
            norm.ours(torch.randn(2, 3), (5,))

    @pytest.mark.parametrize("norm", NORMS, ids=repr)
    def test_empty_normalized_shape(self, norm):
        with pytest.raises(RuntimeError, match="Expected normalized_shape to be at least 1-dimensional"):
            norm.ours(torch.randn(2, 3), ())

    @pytest.mark.parametrize("norm", NORMS, ids=repr)
    def test_weight_shape_mismatch(self, norm):
        with pytest.raises(RuntimeError, match=r"Expected weight to be of same shape as normalized_shape, but got weight of shape \[4\]"):
            norm.ours(torch.randn(2, 3), (3,), torch.randn(4))

    def test_bias_shape_mismatch(self):
        with pytest.raises(RuntimeError, match=r"Expected bias to be of same shape as normalized_shape, but got bias of shape \[2, 3\]"):
            layernorm_ext.layer_norm(torch.randn(2, 3), (3,), None, torch.randn(2, 3))

    @pytest.mark.parametrize("norm", NORMS, ids=repr)
    def test_weight_dtype_mismatch(self, norm):
        with pytest.raises(RuntimeError, match=r"expected weight of dtype Float .* but got weight of dtype Double"):
            norm.ours(torch.randn(2, 3), (3,), torch.randn(3, dtype=torch.float64))

    @pytest.mark.parametrize("norm", NORMS, ids=repr)
    def test_weight_on_another_device(self, norm):
        with pytest.raises(RuntimeError, match=r"expected weight on the input's device cpu, but got weight on meta"):
            norm.ours(torch.randn(2, 3), (3,), torch.empty(3, device="meta"))
