"""LayerNorm and RMSNorm: ill-conditioned rows, empty inputs,
thread-count determinism and errors (their float64 parity over the registry's
samples is in test_float64_reference.py, gradcheck in test_gradcheck.py,
opcheck in test_opcheck.py)."""

import pytest
import torch
import torch.nn.functional as F

import layernorm_ext
from layernorm_ext.op_db import DTYPES, op_info

NORMS = [pytest.param(op_info(name), id=name) for name in ("layer_norm", "rms_norm")]


def _has_bias(info):
    return "bias" in info.backward_outputs


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("mean", [1e4, 1e5])
def test_rows_with_large_mean_normalize_exactly(norm, mean):
    """Two-pass statistics: a large mean and unit spread must not cancel (E[x^2]-E[x]^2 would).

    The bound is one float32 ulp of the mean (1.2e-3 at 1e4), which any float32
    mean carries; a cancelling variance is off by O(1).
    """
    x = torch.randn(64, 1024, dtype=torch.float64).add(mean).float()
    out = norm.op(x, (1024,), eps=1e-5)
    ref = norm.ref(x.double(), (1024,), eps=1e-5)
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


@pytest.mark.parametrize("norm", NORMS)
def test_constant_rows_give_zero_not_nan(norm):
    x = torch.full((3, 17), 2.5)
    out = norm.op(x, (17,), eps=1e-5)
    assert torch.isfinite(out).all()
    if norm.name == "layer_norm":
        assert out.abs().max() == 0


@pytest.mark.parametrize("norm", NORMS)
def test_empty_inputs(norm):
    for shape in [(0, 8), (3, 0, 8)]:
        x = torch.randn(shape, requires_grad=True)
        w = torch.randn(8, requires_grad=True)
        out = norm.op(x, (8,), w)
        assert out.shape == x.shape
        gx, gw = torch.autograd.grad(out.sum(), (x, w))
        assert gx.shape == x.shape and gw.shape == w.shape and gw.abs().sum() == 0


@pytest.mark.parametrize("norm", NORMS)
def test_same_bits_for_any_thread_count(norm):
    x = torch.randn(512, 4096, requires_grad=True)
    w = torch.randn(4096, requires_grad=True)
    b = torch.randn(4096, requires_grad=True)
    grad = torch.randn(512, 4096)

    def run(threads):
        torch.set_num_threads(threads)
        args = (x, (4096,), w, b) if _has_bias(norm) else (x, (4096,), w)
        out = norm.op(*args)
        return [out.detach()] + list(torch.autograd.grad(out, [t for t in args if isinstance(t, torch.Tensor)], grad))

    one, two = run(1), run(2)
    for a, b_ in zip(one, two):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    # (N, C, *spatial): planes within a tile, over several with a ragged last
    # one, channels enough to shrink the tile, 1-D and 3-D spatial dims.
    [(2, 48, 5, 7), (2, 40, 23, 29), (1, 3, 30, 31), (3, 700, 4, 5), (2, 16, 9), (2, 8, 3, 4, 5)],
)
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_first"])
def test_channels_first_input_seen_channels_last_gives_the_contiguous_inputs_bits(
    norm, dtype, shape, grad_layout
):
    """timm's LayerNorm2d normalizes x.permute(0, 2, 3, 1) of an NCHW x, and
    its gradient comes back in either layout. The CPU kernels read such views
    as they are, in tiles of positions gathered into rows: the output and
    grad_input must be the contiguous copy's, bit for bit, contiguous; the
    weight and bias gradients (summed per tile, then over tiles) equal to
    rounding; all of it the same bits whatever the thread count."""
    channels_last = [0] + list(range(2, len(shape))) + [1]
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(dtype).permute(channels_last)
    assert not x.is_contiguous()
    w = torch.randn(shape[1], dtype=dtype)
    b = torch.randn(shape[1], dtype=dtype)
    grad = torch.randn(shape, dtype=dtype).permute(channels_last)
    if grad_layout == "contiguous":
        grad = grad.contiguous()
    threads = torch.get_num_threads()

    def run(input, grad, threads):
        torch.set_num_threads(threads)
        input = input.detach().requires_grad_()
        params = [w.clone().requires_grad_()]
        if _has_bias(norm):
            params.append(b.clone().requires_grad_())
        out = norm.op(input, (shape[1],), *params)
        return [out] + list(torch.autograd.grad(out, [input] + params, grad))

    try:
        expected = run(x.contiguous(), grad.contiguous(), threads)
        actual = run(x, grad, threads)
        assert actual[0].is_contiguous() and actual[1].is_contiguous()
        for a, e in zip(actual[:2], expected[:2]):
            assert torch.equal(a, e)
        tolerance = {"rtol": 1e-2, "atol": 1e-2} if dtype in (torch.float16, torch.bfloat16) else {}
        for a, e in zip(actual[2:], expected[2:]):
            torch.testing.assert_close(a, e, **tolerance)
        for a, e in zip(run(x, grad, 1), actual):
            assert torch.equal(a, e)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("norm", NORMS)
def test_non_contiguous_grad_output(norm):
    x = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, dtype=torch.float64, requires_grad=True)
    args = (x, (10,), w)
    out = norm.op(*args)
    ref = norm.ref(*args)
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
            **op_info("rms_norm").tolerances[dtype])


class TestErrors:
    @pytest.mark.parametrize("norm", NORMS)
    def test_integer_input(self, norm):
        with pytest.raises(NotImplementedError, match=r"not implemented for 'Long': expected a floating-point input"):
            norm.op(torch.arange(6).view(2, 3), (3,))

    @pytest.mark.parametrize("norm", NORMS)
    def test_normalized_shape_mismatch(self, norm):
        with pytest.raises(RuntimeError, match=r"Given normalized_shape=\[5\], expected input with shape \[\*, 5\], but got input of size\[2, 3\]"):
            norm.op(torch.randn(2, 3), (5,))

    @pytest.mark.parametrize("norm", NORMS)
    def test_empty_normalized_shape(self, norm):
        with pytest.raises(RuntimeError, match="Expected normalized_shape to be at least 1-dimensional"):
            norm.op(torch.randn(2, 3), ())

    @pytest.mark.parametrize("norm", NORMS)
    def test_weight_shape_mismatch(self, norm):
        with pytest.raises(RuntimeError, match=r"Expected weight to be of same shape as normalized_shape, but got weight of shape \[4\]"):
            norm.op(torch.randn(2, 3), (3,), torch.randn(4))

    def test_bias_shape_mismatch(self):
        with pytest.raises(RuntimeError, match=r"Expected bias to be of same shape as normalized_shape, but got bias of shape \[2, 3\]"):
            layernorm_ext.layer_norm(torch.randn(2, 3), (3,), None, torch.randn(2, 3))

    @pytest.mark.parametrize("norm", NORMS)
    def test_weight_dtype_mismatch(self, norm):
        with pytest.raises(RuntimeError, match=r"expected weight of dtype Float .* but got weight of dtype Double"):
            norm.op(torch.randn(2, 3), (3,), torch.randn(3, dtype=torch.float64))

    @pytest.mark.parametrize("norm", NORMS)
    def test_weight_on_another_device(self, norm):
        with pytest.raises(RuntimeError, match=r"expected weight on the input's device cpu, but got weight on meta"):
            norm.op(torch.randn(2, 3), (3,), torch.empty(3, device="meta"))
